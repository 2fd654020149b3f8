"""On-disk model checkpoints: weights in safetensors, everything else in JSON; nothing is unpickled.

A checkpoint directory holds ``model.safetensors`` and ``meta.json``. The metadata says what the
weights are (teacher or student, sampling steps, round), how to build the network (model and data
settings, parameterization, noise schedule) and the full run configuration that produced them.
Writes go to a temporary directory that is renamed into place, so a crash never leaves a
half-written checkpoint under the final name.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping

import torch
from safetensors.torch import load_file, save_file

from raypd.config import Config, ConfigError, DataConfig, ModelConfig, _build, _plain, migrate, redact
from raypd.diffusion import make_logsnr_fn
from raypd.models import Denoiser, build_denoiser
from raypd.models.convert import convert_state, is_legacy
from raypd.models.guidance import fit_frequencies

FORMAT = "raypd-checkpoint"
VERSION = 1
WEIGHTS, META = "model.safetensors", "meta.json"


class CheckpointError(ValueError):
    """A checkpoint that is missing, malformed, or does not fit the model it is loaded into."""


@dataclass(frozen=True)
class CheckpointMeta:
    kind: Literal["teacher", "student"]
    sampling_steps: int
    round: int | None
    model: ModelConfig
    data: DataConfig
    logsnr_min: float
    logsnr_max: float
    config: dict[str, Any]
    metrics: dict[str, float]
    schedule: str = "cosine"
    discrete_betas: tuple[float, ...] = ()
    """The noise schedule (``diffusion.schedule``) and, for ``discrete``, its betas: what ``make_logsnr_fn`` needs."""
    guidance_input: bool = False
    """A w-conditioned network (a guided distillation's student): it takes the guidance weight as an input."""

    def logsnr_fn(self):
        """The t -> logsnr function these weights were trained on."""
        return make_logsnr_fn(self.schedule, logsnr_min=self.logsnr_min, logsnr_max=self.logsnr_max,
                              betas=self.discrete_betas)

    def to_json(self) -> dict[str, Any]:
        schedule: dict[str, Any] = {"logsnr_min": self.logsnr_min, "logsnr_max": self.logsnr_max}
        if self.schedule != "cosine":  # cosine checkpoints keep the format they always had
            schedule.update(kind=self.schedule, discrete_betas=list(self.discrete_betas))
        return {
            "format": FORMAT, "version": VERSION, "kind": self.kind, "sampling_steps": self.sampling_steps,
            "round": self.round, "parameterization": self.model.parameterization, "schedule": schedule,
            "model": _section(self.model), "data": redact(_section(self.data)), "config": redact(self.config),
            "metrics": self.metrics, **({"guidance_input": True} if self.guidance_input else {}),
        }


def _section(obj: Any) -> dict[str, Any]:
    return _plain(dataclasses.asdict(obj))


def meta_for(cfg: Config, *, kind: Literal["teacher", "student"], sampling_steps: int, round: int | None,
             metrics: dict[str, float] | None = None, guidance_input: bool = False) -> CheckpointMeta:
    return CheckpointMeta(kind, sampling_steps, round, cfg.model, cfg.data, cfg.diffusion.logsnr_min,
                          cfg.diffusion.logsnr_max, cfg.to_dict(), dict(metrics or {}),
                          cfg.diffusion.schedule, tuple(cfg.diffusion.discrete_betas), guidance_input)


def save_checkpoint(path: str | Path, model: Denoiser | Mapping[str, torch.Tensor], meta: CheckpointMeta) -> Path:
    """Write weights (a model, or its state dict) and metadata atomically to ``path`` (replacing an older one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        weights = model if isinstance(model, Mapping) else model.state_dict()
        state = {k: v.detach().contiguous().cpu() for k, v in weights.items()}
        save_file(state, str(tmp / WEIGHTS))
        # the weights' digest goes in the metadata, written last: a checkpoint whose weights were cut
        # short or altered afterwards is recognised as damaged instead of loading garbage
        (tmp / META).write_text(json.dumps({**meta.to_json(), "weights_sha256": _sha256(tmp / WEIGHTS)}, indent=2))
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def add_metrics(path: str | Path, metrics: dict[str, float]) -> None:
    """Merge numbers into a saved checkpoint's metadata (replacing meta.json atomically)."""
    meta = Path(path) / META
    raw = json.loads(meta.read_text())
    raw["metrics"] = {**raw.get("metrics", {}), **metrics}
    tmp = meta.with_name(f".{META}.tmp")
    tmp.write_text(json.dumps(raw, indent=2))
    os.replace(tmp, meta)


def publish_checkpoint(source: str | Path, output: str | Path, metrics: dict | None = None) -> Path:
    """Copy a finished stage's checkpoint to ``output`` (with ``metrics`` merged into its metadata) through a
    temporary name, so ``output`` is whole or absent."""
    output = Path(output)
    tmp = output.with_name(f".{output.name}.incoming")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    if metrics:
        add_metrics(tmp, metrics)
    shutil.rmtree(output, ignore_errors=True)
    tmp.rename(output)
    return output


def read_meta(path: str | Path) -> CheckpointMeta:
    path = Path(path)
    if not (path / META).is_file() or not (path / WEIGHTS).is_file():
        raise CheckpointError(f"{path} is not a raypd checkpoint: expected {WEIGHTS} and {META} inside")
    try:
        raw = json.loads((path / META).read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path / META} is not valid JSON: {err}") from None
    if raw.get("format") != FORMAT or raw.get("version") != VERSION:
        raise CheckpointError(f"{path / META}: format {raw.get('format')!r} version {raw.get('version')!r} "
                              f"is not {FORMAT!r} version {VERSION}")
    try:
        model = _build(ModelConfig, raw["model"], "model")
        data = _build(DataConfig, raw["data"], "data")
        schedule = raw["schedule"]
        return CheckpointMeta(raw["kind"], int(raw["sampling_steps"]), raw["round"], model, data,
                              float(schedule["logsnr_min"]), float(schedule["logsnr_max"]),
                              migrate(raw["config"]), raw.get("metrics", {}), schedule.get("kind", "cosine"),
                              tuple(float(b) for b in schedule.get("discrete_betas", ())),
                              bool(raw.get("guidance_input", False)))
    except (KeyError, TypeError, ConfigError) as err:
        raise CheckpointError(f"{path / META} is malformed: {err}") from None


def weights_digest(path: str | Path) -> str:
    """The sha256 of a checkpoint's weights: the one its metadata records, else computed."""
    path = Path(path)
    return json.loads((path / META).read_text()).get("weights_sha256") or _sha256(path / WEIGHTS)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_weights(path: str | Path) -> None:
    """Raise CheckpointError when the weights no longer match the digest recorded at saving."""
    path = Path(path)
    want = json.loads((path / META).read_text()).get("weights_sha256")
    if want is not None and _sha256(path / WEIGHTS) != want:
        raise CheckpointError(f"{path} is damaged: {WEIGHTS} does not match the digest in {META} "
                              "(cut short or modified after it was saved)")


def load_checkpoint(path: str | Path, *, map_location: str | torch.device = "cpu") -> tuple[Denoiser, CheckpointMeta]:
    """Build the denoiser the metadata describes and load its weights (safetensors: no code runs)."""
    meta = read_meta(path)
    verify_weights(path)
    try:
        model = build_denoiser(meta.model, meta.data, guidance_input=meta.guidance_input)
    except ConfigError as err:  # e.g. a former network's settings that a UNet2DModel cannot express
        raise CheckpointError(f"{path}: its model settings cannot be built ({err})") from None
    try:
        state = load_file(str(Path(path) / WEIGHTS), device=str(map_location))
    except Exception as err:  # noqa: BLE001 - safetensors reports any malformed file as its own error type
        raise CheckpointError(f"{path}: {WEIGHTS} is not a readable safetensors file ({err})") from None
    if meta.model.backbone == "unet" and is_legacy(state):  # written by raypd's former hand-written UNet
        try:
            state = convert_state(state, meta.model, meta.data)
        except KeyError as err:
            raise CheckpointError(f"{path}: weights do not match the model in its metadata ({err.args[0]})") from None
    if meta.guidance_input:
        fit_frequencies(model, state)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not match the model in its metadata "
                              f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})")
    return model, meta


def check_compatible(meta: CheckpointMeta, cfg: Config, path: str | Path) -> None:
    """Fail early when a checkpoint cannot serve as this run's teacher."""
    problems = []
    for name in ("resolution", "channels", "num_classes"):
        if getattr(meta.data, name) != getattr(cfg.data, name):
            problems.append(f"data.{name} is {getattr(meta.data, name)} in the checkpoint, "
                            f"{getattr(cfg.data, name)} in the config")
    if (meta.logsnr_min, meta.logsnr_max) != (cfg.diffusion.logsnr_min, cfg.diffusion.logsnr_max):
        problems.append(f"the noise schedule differs: checkpoint logsnr in [{meta.logsnr_min}, {meta.logsnr_max}], "
                        f"config [{cfg.diffusion.logsnr_min}, {cfg.diffusion.logsnr_max}]")
    if (meta.schedule, meta.discrete_betas) != (cfg.diffusion.schedule, tuple(cfg.diffusion.discrete_betas)):
        problems.append(f"the noise schedule differs: checkpoint {meta.schedule!r}, config {cfg.diffusion.schedule!r}"
                        + (" (different betas)" if meta.schedule == cfg.diffusion.schedule else ""))
    # dropout is a training setting, not part of the architecture; label dropout only adds the "no class" label
    mine, theirs = _section(cfg.model), _section(meta.model)
    diffs = [f"model.{k}" for k, v in mine.items() if k not in ("dropout", "class_dropout") and theirs[k] != v]
    if (mine["class_dropout"] > 0) != (theirs["class_dropout"] > 0):
        diffs.append("model.class_dropout (a 'no class' label in one, not the other)")
    if diffs:
        problems.append(f"the model differs in {', '.join(diffs)}")
    if problems:
        raise CheckpointError(f"checkpoint {path} does not fit this config: " + "; ".join(problems))
