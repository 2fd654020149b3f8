"""Export any distilled student as a diffusers pipeline directory that samples exactly as raypd does.

    raypd export --checkpoint runs/local/round-05-1steps --out student-1step/

The directory holds model_index.json, unet/ (a stock ``UNet2DModel``: config.json and
diffusion_pytorch_model.safetensors), scheduler/ (a stock ``DDIMScheduler``) and a README.md model
card; ``DiffusionPipeline.from_pretrained(DIR)`` samples it offline.

* **The grid.** raypd's N student steps are t_i = i / N. The scheduler's chain has T timesteps with
  t = (k + 1) / T (T a multiple of N: the imported teacher's own T, else N * ceil(1000 / N)), and
  ``trained_betas`` put alphas_cumprod[k] on raypd's alpha^2((k + 1) / T). DDIM's ``"trailing"``
  spacing with ``steps_offset`` 0 then visits k_i = i T / N - 1, i.e. exactly t_i, and
  ``set_alpha_to_one`` makes the last step return x_hat, as raypd's last step does.
* **The time input.** raypd's network is conditioned on continuous logsnr. The exported UNet takes
  an integer timestep through a learned embedding table (``time_embedding_type="learned"``) whose
  row k holds raypd's sinusoid of logsnr((k + 1) / T), so integer timesteps reproduce raypd's
  conditioning exactly. An imported diffusers network keeps its own integer timesteps.
* **The output.** x, v and eps students are a stock ``DDIMPipeline`` (prediction types sample,
  v_prediction, epsilon). The paper's combined output (``both``) is exact as ``v_prediction`` at one
  step: at t = 1 both heads fold into one output conv. Class-conditional students, and ``both`` at
  more steps, get ``RaypdDDIMPipeline`` (``raypd_pipeline.py``, written into the directory and loaded
  by diffusers from there, with ``trust_remote_code=True``), which takes ``class_labels``. A guided
  distillation's student also gets a ``guidance`` component (``guidance/raypd_guidance.py``) that embeds
  (label, w); the pipeline then takes ``guidance_scale`` = 1 + w, and the check samples at the middle of the
  run's scored weights.
* **Clipping** is as the student samples in raypd (x_hat clipped to [-1, 1] every step and eps
  derived from the clipped x_hat: ``clip_sample`` with ``use_clipped_model_output=True``); ``--no-clip``
  exports raypd's unclipped sampler.

After writing, the export loads the directory with diffusers and samples it against raypd's sampler
from the same noise (:func:`check_export`), so a directory that does not sample as raypd does is
never left behind.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from raypd.checkpoint import CheckpointError, CheckpointMeta, load_checkpoint
from raypd.diffusion.schedule import alpha_sigma
from raypd.hf.scheduler import PREDICTION_TYPE_OF
from raypd.models import Denoiser

PIPELINE_FILE = Path(__file__).with_name("raypd_pipeline.py")
PIPELINE_CLASS = "RaypdDDIMPipeline"
GUIDANCE_FILE = Path(__file__).with_name("raypd_guidance.py")
GUIDANCE_CLASS = "GuidanceEmbedding"
TOLERANCE = (1e-4, 1e-6)
"""A pipeline matches raypd when max |diff| <= 1e-4 + 1e-6 max |x| over samples from the same noise."""
EPS_UNCLIPPED_RELATIVE = 1e-4
"""The relative part for unclipped eps students. diffusers holds betas in float32, and at t = 1 (alpha^2 = 2e-9
after a last step whose 1 - beta is ~8e-4) that pins alpha to ~4e-5 relative; an eps student's unclipped x_hat
divides by alpha, so it carries that relative error (a trained one, |x| ~ 1, stays within 1e-4 absolute)."""


class ExportError(CheckpointError):
    """A checkpoint that cannot be written as a diffusers pipeline, or an export that does not sample as raypd does."""


@dataclass(frozen=True)
class Plan:
    """How one student is written: the chain, the prediction type, and which pipeline class."""

    steps: int
    total: int
    """T, the scheduler's number of training timesteps (a multiple of ``steps``)."""
    betas: tuple[float, ...]
    logsnr: torch.Tensor
    """float32 logsnr at t = (k + 1) / T, k = 0 .. T-1, as raypd's sampler computes it."""
    prediction_type: str
    """What the exported network outputs, in diffusers' words; ``sample`` for the raypd pipeline (it computes x_hat)."""
    custom: bool
    fold: bool
    """``both`` at one step: the two heads folded into a v output at t = 1."""
    clip: bool


def plan_export(meta: CheckpointMeta, steps: int, *, clip: bool = True) -> Plan:
    """Decide the chain and pipeline for this student at ``steps`` steps (ExportError when it cannot be exact)."""
    if steps < 1:
        raise ExportError(f"steps must be positive, got {steps}")
    sampler = meta.metrics.get("sampler", "ddim")
    if sampler == "consistency" and steps > 1:
        raise ExportError(f"this consistency model samples in {steps} steps by the multistep consistency sampler, "
                          "which renoises each x_hat on raypd's grid; diffusers' CMStochasticIterativeScheduler "
                          "works on EDM's Karras sigmas instead, so export it at --steps 1 (one step is DDIM's)")
    if sampler not in ("ddim", "consistency"):
        raise ExportError(f"this student samples with its method's {sampler!r} sampler; export writes pipelines that "
                          "sample by DDIM")
    if meta.model.backbone == "diffusers" and (meta.schedule != "discrete"
                                               or tuple(meta.discrete_betas) != tuple(meta.model.diffusers_betas)):
        raise ExportError("the run's noise schedule is not the imported network's own discrete schedule, so a "
                          "diffusers scheduler would feed it timesteps it never saw in distillation")
    if meta.schedule == "discrete":
        total, betas = len(meta.discrete_betas), tuple(meta.discrete_betas)
        if total % steps:
            raise ExportError(f"{steps} steps do not divide the {total} training timesteps of the network's discrete "
                              "schedule, so the step grid t = i/N falls between the integer timesteps it knows")
    else:
        total = steps * math.ceil(1000 / steps)
    t = torch.tensor([(k + 1) / total for k in range(total)], dtype=torch.float32)
    logsnr = meta.logsnr_fn()(t).float()
    if meta.schedule != "discrete":
        alphas_cumprod = torch.sigmoid(logsnr.double())
        previous = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        betas = tuple((1 - alphas_cumprod / previous).tolist())
    param = meta.model.parameterization
    custom = bool(meta.data.num_classes) or (param == "both" and steps > 1)
    fold = param == "both" and not custom
    prediction = "sample" if custom else ("v_prediction" if fold else PREDICTION_TYPE_OF[param])
    return Plan(steps, total, betas, logsnr, prediction, custom, fold, clip)


def ddim_scheduler(plan: Plan):
    """The stock DDIMScheduler whose N-step grid is raypd's (see the module docstring)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=plan.total, trained_betas=list(plan.betas),
                         prediction_type=plan.prediction_type, clip_sample=plan.clip, set_alpha_to_one=True,
                         steps_offset=0, timestep_spacing="trailing")


def verify_grid(scheduler, plan: Plan) -> None:
    """Fail unless the scheduler's N-step timesteps are raypd's and its alphas_cumprod there are raypd's alpha^2."""
    scheduler.set_timesteps(plan.steps)
    want = [i * plan.total // plan.steps - 1 for i in range(plan.steps, 0, -1)]
    if scheduler.timesteps.tolist() != want:
        raise ExportError(f"the scheduler's {plan.steps}-step timesteps {scheduler.timesteps.tolist()} are not "
                          f"raypd's {want}")
    ours = torch.sigmoid(plan.logsnr.double()[want])
    theirs = scheduler.alphas_cumprod[want].double()
    if not torch.allclose(theirs, ours, rtol=1e-4, atol=0):
        raise ExportError(f"the scheduler's alphas_cumprod at the student's steps {theirs.tolist()} differ from "
                          f"raypd's alpha^2 {ours.tolist()}")


def export_unet(model: Denoiser, plan: Plan):
    """The student's network as the UNet2DModel the pipeline drives with integer timesteps."""
    from diffusers import UNet2DModel

    from raypd.models.imported import DiffusersUNet

    backbone = model.backbone
    unet = backbone.unet
    config = {k: v for k, v in unet.config.items() if not k.startswith("_")}
    state = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    if not isinstance(backbone, DiffusersUNet):  # continuous logsnr -> a table of raypd's embedding at each k
        with torch.no_grad():
            state["time_proj.weight"] = unet.time_proj(backbone.time_input(plan.logsnr)).float()
        config.update(time_embedding_type="learned", num_train_timesteps=plan.total)
    if plan.fold:  # x_hat = sigma^2 x_out + alpha z - alpha sigma eps_out = alpha z - sigma v at t = 1
        alpha, sigma = alpha_sigma(plan.logsnr[-1:])
        channels = config["out_channels"] // 2
        for name in ("conv_out.weight", "conv_out.bias"):
            x_head, eps_head = state[name].split(channels, dim=0)
            state[name] = alpha * eps_head - sigma * x_head
        config["out_channels"] = channels
    if model.guidance_input:  # the class embedding moves to the guidance component; the UNet adds what it gives
        for name in [k for k in state if k.startswith("class_embedding.")]:
            del state[name]
        config.update(class_embed_type="identity", num_class_embeds=None)
    exported = UNet2DModel(**config)
    exported.load_state_dict(state, strict=True)
    return exported.eval()


def export_guidance(model: Denoiser, meta: CheckpointMeta):
    """A w-conditioned student's class and w embeddings as the pipeline's ``guidance`` component."""
    from raypd.hf.raypd_guidance import GuidanceEmbedding

    embedding = model.backbone.unet.class_embedding
    component = GuidanceEmbedding(num_classes=meta.data.num_classes, num_embeddings=embedding.num_embeddings,
                                  embedding_dim=embedding.embedding_dim,
                                  frequencies=embedding.frequencies)
    state = {("classes.weight" if k == "weight" else k): v.detach().clone() for k, v in embedding.state_dict().items()}
    component.load_state_dict(state, strict=True)
    return component.eval()


def build_pipeline(model: Denoiser, meta: CheckpointMeta, plan: Plan):
    from diffusers import DDIMPipeline

    scheduler = ddim_scheduler(plan)
    verify_grid(scheduler, plan)
    unet = export_unet(model, plan)
    if not plan.custom:
        return DDIMPipeline(unet=unet, scheduler=scheduler)
    from raypd.hf.raypd_pipeline import RaypdDDIMPipeline

    guidance = export_guidance(model, meta) if model.guidance_input else None
    return RaypdDDIMPipeline(unet=unet, scheduler=scheduler, parameterization=meta.model.parameterization,
                             sampling_steps=plan.steps, guidance=guidance)


def load_pipeline(path: str | Path):
    """The exported directory as diffusers loads it, offline (the raypd pipeline from the directory's own file)."""
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(str(path), local_files_only=True, trust_remote_code=True,
                                             low_cpu_mem_usage=False)


@torch.no_grad()
def pipeline_samples(pipe, n: int, *, seed: int, labels: torch.Tensor | None, steps: int,
                     w: float | None = None) -> torch.Tensor:
    """n samples in [-1, 1] from the pipeline, its noise drawn from ``torch.Generator().manual_seed(seed)`` (``w``:
    a guided student's weight, passed as guidance_scale 1 + w)."""
    generator = torch.Generator().manual_seed(seed)
    if type(pipe).__name__ == PIPELINE_CLASS:
        kwargs = {} if labels is None else {"class_labels": labels}
        if w is not None:
            kwargs["guidance_scale"] = 1.0 + w
        return pipe(batch_size=n, generator=generator, num_inference_steps=steps, output_type="pt", **kwargs).images
    out = pipe(batch_size=n, generator=generator, num_inference_steps=steps, eta=0.0,
               use_clipped_model_output=True, output_type="np").images
    return torch.from_numpy(out).permute(0, 3, 1, 2) * 2 - 1  # DDIMPipeline returns (x + 1) / 2 clamped to [0, 1]


def pipeline_noise(n: int, channels: int, resolution: int, *, seed: int, num_classes: int = 0):
    """(z, labels): the noise a diffusers pipeline draws from ``torch.Generator().manual_seed(seed)`` (one
    ``randn`` of the whole batch), and class labels drawn after it from the same generator."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, channels, resolution, resolution, generator=g)
    return z, (torch.randint(0, num_classes, (n,), generator=g) if num_classes > 0 else None)


def raypd_samples(model: Denoiser, meta: CheckpointMeta, n: int, *, seed: int, steps: int, clip: bool,
                  w: float | None = None):
    """(samples, labels) of raypd's own DDIM sampler from the same noise the pipeline draws."""
    from raypd.diffusion import ddim_sample

    z, y = pipeline_noise(n, meta.data.channels, meta.data.resolution, seed=seed, num_classes=meta.data.num_classes)
    with torch.no_grad():
        x = ddim_sample(model.eval().bind(y, w), z, steps, clip=clip, logsnr_fn=meta.logsnr_fn())
    return x, y


def check_weight(meta: CheckpointMeta) -> float | None:
    """The guidance weight a guided student's export is checked at: the middle one its run scores."""
    if not meta.guidance_input:
        return None
    from raypd.config import config_from_dict

    return config_from_dict(meta.config).middle_guidance_weight()


def tolerance(parameterization: str, clip: bool, scale: float) -> float:
    """The largest max |diff| between exported and raypd samples of magnitude up to ``scale`` that counts as equal."""
    relative = EPS_UNCLIPPED_RELATIVE if parameterization == "eps" and not clip else TOLERANCE[1]
    return TOLERANCE[0] + relative * scale


def check_export(path: str | Path, model: Denoiser, meta: CheckpointMeta, plan: Plan, *, n: int = 2,
                 seed: int = 0) -> float:
    """Max |diff| between the saved pipeline's samples and raypd's from the same noise; ExportError beyond tolerance."""
    w = check_weight(meta)
    ours, labels = raypd_samples(model, meta, n, seed=seed, steps=plan.steps, clip=plan.clip, w=w)
    pipe = load_pipeline(path)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipeline_samples(pipe, n, seed=seed, labels=labels, steps=plan.steps, w=w)
    if not plan.custom:
        ours = ours.clamp(-1, 1)  # a stock pipeline returns images clamped to [0, 1]
    diff = (theirs.double() - ours.double()).abs().max().item()
    limit = tolerance(meta.model.parameterization, plan.clip, ours.abs().max().item())
    if not diff <= limit:
        raise ExportError(f"the exported pipeline does not sample as raypd does: max |diff| {diff:.3g} over {n} "
                          f"samples exceeds {limit:.3g}")
    return diff


def _find_fid(checkpoint: Path, meta: CheckpointMeta, steps: int) -> float | None:
    """FID of this student: from its metrics, else from its run's summary.json."""
    if "fid" in meta.metrics:
        return float(meta.metrics["fid"])
    summary = checkpoint.resolve().parent / "summary.json"
    try:
        rows = json.loads(summary.read_text()).get("eval", [])
    except (OSError, ValueError):
        return None
    w = check_weight(meta)
    for row in rows:
        if row.get("sampler") == "distilled" and row.get("steps") == steps and row.get("fid") is not None \
                and row.get("guidance") == w:
            return float(row["fid"])
    return None




def model_card(checkpoint: Path, meta: CheckpointMeta, plan: Plan, match: float | None) -> str:
    """README.md: what the student is, where it came from, how well it samples, how to load it."""
    cfg = meta.config
    teacher, data, distill, ev = (cfg.get(k, {}) for k in ("teacher", "data", "distill", "eval"))
    steps = plan.steps
    fid = _find_fid(checkpoint, meta, steps)
    w = check_weight(meta)
    fid_text = "not measured" if fid is None else \
        f"{fid:.3f} ({ev.get('extractor', '?')} features, {ev.get('num_samples', '?')} samples, raypd's clipped sampler" \
        + ("" if w is None else f", guidance w = {w:g}, guidance_scale {1 + w:g}") + ")"
    source = teacher.get("diffusers_path") or teacher.get("checkpoint") or \
        f"trained by raypd ({teacher.get('updates', '?')} updates, {teacher.get('sampling_steps', '?')}-step sampler)"
    dataset = " ".join(str(v) for v in (data.get("source"), data.get("path")) if v)
    clip = ", use_clipped_model_output=True" if plan.clip else ""
    if plan.custom:
        labels = "class_labels=[0, 1, 2, 3], " if meta.data.num_classes else "batch_size=4, "
        if meta.guidance_input:
            low, high = distill.get("guidance_min", 0.0), distill.get("guidance_max", 0.0)
            labels += f"guidance_scale={1 + (low + high) / 2:g}, "
        load = f"""```python
from diffusers import DiffusionPipeline

# the sampler is raypd_pipeline.py in this directory: read it, then allow it with trust_remote_code
pipe = DiffusionPipeline.from_pretrained("path/to/this/directory", trust_remote_code=True)
images = pipe({labels}num_inference_steps={steps}).images
```"""
        pipeline = f"`{PIPELINE_CLASS}` (raypd_pipeline.py here: stock UNet2DModel and DDIMScheduler, " + \
            ("class labels" if meta.data.num_classes else "the combined x/eps output") + \
            (f"; classifier-free guidance distilled into the student: guidance_scale = 1 + w, w in "
             f"[{distill.get('guidance_min', 0.0):g}, {distill.get('guidance_max', 0.0):g}]" if meta.guidance_input
             else "") + ")"
    else:
        load = f"""```python
from diffusers import DDIMPipeline

pipe = DDIMPipeline.from_pretrained("path/to/this/directory")
images = pipe(batch_size=4, num_inference_steps={steps}, eta=0.0{clip}).images
```"""
        pipeline = "stock `DDIMPipeline`"
    match_text = "" if match is None else f"| check at export | max abs difference {match:.2g} from raypd's sampler (same noise, [-1, 1] scale) |\n"
    return f"""---
library_name: diffusers
pipeline_tag: unconditional-image-generation
tags: [progressive-distillation, ddim, raypd]
---

# {steps}-step progressively distilled student

A diffusion model distilled with progressive distillation (Salimans & Ho, ICLR 2022) by raypd, to
sample in **{steps} DDIM step{'s' if steps != 1 else ''}**.

| | |
|---|---|
| sampling steps | {steps} (deterministic DDIM, eta 0) |
| teacher | {source} |
| distillation | {distill.get('start_steps', '?')} -> {steps} steps, halving each round{f", round {meta.round}" if meta.round is not None else ""} |
| data | {dataset or '?'} at {meta.data.channels}x{meta.data.resolution}x{meta.data.resolution}{f", {meta.data.num_classes} classes" if meta.data.num_classes else ""} |
| FID | {fid_text} |
| pipeline | {pipeline} |
| network output | {meta.model.parameterization}{" (folded into v_prediction at t = 1)" if plan.fold else ""} |
{match_text}
{load}

With `num_inference_steps={steps}` the scheduler (DDIM, trailing spacing over {plan.total} timesteps,
final alpha 1) lands on exactly the noise levels the student was distilled for, and the samples equal
raypd's own sampler for the same initial noise (`torch.Generator().manual_seed(s)`), x_hat
{'clipped to [-1, 1] at every step' if plan.clip else 'unclipped'}. Other step counts run the network on a grid it
was not distilled for.
"""


def export_student(checkpoint: str | Path, out: str | Path, *, steps: int | None = None, clip: bool = True,
                   overwrite: bool = False, check: bool = True) -> tuple[Path, float | None]:
    """Write the student at ``checkpoint`` as a pipeline directory at ``out`` (atomically); (out, checked difference)."""
    checkpoint, out = Path(checkpoint), Path(out)
    if out.exists() and not overwrite:
        raise ExportError(f"{out} already exists (pass overwrite to replace it)")
    model, meta = load_checkpoint(checkpoint)
    plan = plan_export(meta, meta.sampling_steps if steps is None else steps, clip=clip)
    pipe = build_pipeline(model, meta, plan)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        if plan.custom:  # diffusers loads the class from this file in the directory itself
            shutil.copyfile(PIPELINE_FILE, tmp / PIPELINE_FILE.name)
            index = json.loads((tmp / "model_index.json").read_text())
            index["_class_name"] = [PIPELINE_FILE.stem, PIPELINE_CLASS]
            if (index.get("guidance") or [None])[0] is not None:  # its class comes from the file in its folder
                shutil.copyfile(GUIDANCE_FILE, tmp / "guidance" / GUIDANCE_FILE.name)
                index["guidance"] = [GUIDANCE_FILE.stem, GUIDANCE_CLASS]
            (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
        match = check_export(tmp, model, meta, plan) if check else None
        (tmp / "README.md").write_text(model_card(checkpoint, meta, plan, match))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out, match


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="raypd export", description="Write a student as a diffusers pipeline.")
    parser.add_argument("--checkpoint", required=True, help="a raypd student checkpoint directory")
    parser.add_argument("--out", required=True, help="the pipeline directory to write")
    parser.add_argument("--steps", type=int, help="sampling steps (default: the checkpoint's own)")
    parser.add_argument("--clip", "--clip-sample", action=argparse.BooleanOptionalAction, default=True,
                        help="clip x_hat to [-1, 1] every step, as raypd samples (--no-clip: raypd's unclipped sampler)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    parser.add_argument("--no-check", dest="check", action="store_false",
                        help="skip sampling the written pipeline against raypd's sampler")
    args = parser.parse_args(argv)
    try:
        out, match = export_student(args.checkpoint, args.out, steps=args.steps, clip=args.clip,
                                    overwrite=args.overwrite, check=args.check)
    except CheckpointError as err:
        print(f"export error: {err}", file=sys.stderr)
        return 2
    if match is not None:
        print(f"checked: the pipeline's samples are within {match:.2g} of raypd's sampler", file=sys.stderr)
    print(out)
    return 0
