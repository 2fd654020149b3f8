"""Import a diffusers UNet2DModel (and its scheduler) as a raypd teacher checkpoint.

The result is a normal raypd checkpoint: the UNet's weights in model.safetensors, and meta.json with
backbone ``diffusers``, the UNet2DModel config, and the teacher's discrete schedule (its betas). So
``load_checkpoint``, the Ray workers, ``raypd sample`` and everything else work on it unchanged and
never need the diffusers directory again (they do need the diffusers package to build the network).

The run that distils it uses the teacher's own noise schedule (``diffusion.schedule: discrete``): the
network only knows its T trained noise levels, and t = (k + 1) / T puts raypd's step grids on them.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raypd.checkpoint import CheckpointError, CheckpointMeta, meta_for, save_checkpoint
from raypd.config import Config, ConfigError, config_from_dict
from raypd.hf.scheduler import DiscreteChain, read_scheduler
from raypd.models import Denoiser
from raypd.models.imported import DiffusersUNet, UnsupportedModelError, check_unet_config

_LATENT = ("vae", "vqvae", "movq")
_CONDITIONING = ("text_encoder", "text_encoder_2", "tokenizer", "image_encoder", "prior", "bert")


@dataclass(frozen=True)
class Source:
    """Where a diffusers model's parts are: the UNet (path + subfolder) and both configs."""

    path: str
    unet_subfolder: str | None
    unet_config: dict[str, Any]
    scheduler_config: dict[str, Any]


def _load_config(cls, path: str, subfolder: str | None, local_only: bool) -> dict[str, Any] | None:
    try:
        return dict(cls.load_config(path, subfolder=subfolder, local_files_only=local_only))
    except (OSError, ValueError):
        return None


def _check_pipeline_index(index: dict[str, Any]) -> None:
    """Refuse latent and text-conditioned pipelines by their components, before reading anything else."""
    parts = {k: v for k, v in index.items() if not k.startswith("_") and isinstance(v, (list, tuple)) and v[0]}
    pipeline = index.get("_class_name", "pipeline")
    latent = [k for k in _LATENT if k in parts]
    if latent:
        raise UnsupportedModelError(f"{pipeline} is a latent diffusion pipeline (it has a {latent[0]}); raypd "
                                    "distils pixel-space models only")
    conditioning = [k for k in _CONDITIONING if k in parts]
    if conditioning:
        raise UnsupportedModelError(f"{pipeline} is conditioned through a {conditioning[0]}; raypd feeds class "
                                    "labels at most")
    unet = parts.get("unet")
    if unet is None:
        raise UnsupportedModelError(f"{pipeline} has no 'unet' component")
    if unet[1] != "UNet2DModel":
        raise UnsupportedModelError(f"the pipeline's unet is a {unet[1]}; raypd drives UNet2DModel only")


def locate(path: str, *, local_only: bool) -> Source:
    """Find the UNet and scheduler configs of a pipeline directory, a UNet directory, or a hub id."""
    import diffusers
    looks_local = os.path.isabs(path) or path.startswith((".", "~")) or os.path.exists(path)
    if looks_local and not os.path.isdir(os.path.expanduser(path)):
        raise CheckpointError(f"teacher.diffusers_path: {path} is not a directory")
    path = os.path.expanduser(path)
    index = _load_config(diffusers.DiffusionPipeline, path, None, local_only)
    if index is not None:
        _check_pipeline_index(index)
    unet_sub, unet_config = None, None
    for sub in ("unet", None):
        unet_config = _load_config(diffusers.UNet2DModel, path, sub, local_only)
        if unet_config is not None:
            unet_sub = sub
            break
    hint = "" if looks_local else " (for a hub id: is it spelled right, and is the hub reachable or the model cached?)"
    if unet_config is None:
        raise CheckpointError(f"teacher.diffusers_path: no UNet config (unet/config.json or config.json) at {path}{hint}")
    candidates = [(path, "scheduler"), (path, None)]
    if looks_local and unet_sub is None:
        candidates.append((os.path.join(path, os.pardir), "scheduler"))  # a pipeline's unet/ given directly
    for where, sub in candidates:
        scheduler_config = _load_config(diffusers.DDPMScheduler, where, sub, local_only)
        if scheduler_config is not None:
            return Source(path, unet_sub, unet_config, scheduler_config)
    raise CheckpointError(f"teacher.diffusers_path: no scheduler config (scheduler/scheduler_config.json or "
                          f"scheduler_config.json) at {path}; raypd needs the noise schedule the UNet was trained "
                          f"with{hint}")


def _plain_config(config) -> dict[str, Any]:
    """A UNet2DModel config as plain JSON data (tuples to lists), without diffusers' bookkeeping keys."""
    def plain(v):
        return [plain(x) for x in v] if isinstance(v, (list, tuple)) else v
    return {k: plain(v) for k, v in dict(config).items() if not k.startswith("_")}


def check_source(cfg: Config) -> tuple[Source, DiscreteChain]:
    """Every check of ``teacher.diffusers_path`` that needs no weights (configs only): for dry runs and imports."""
    t, d = cfg.teacher, cfg.data
    try:
        source = locate(t.diffusers_path, local_only=t.diffusers_local_only)
        chain = read_scheduler(source.scheduler_config)
        check_unet_config(source.unet_config, channels=d.channels, resolution=d.resolution, num_classes=d.num_classes,
                          null_class=cfg.model.class_dropout > 0)
    except UnsupportedModelError as err:
        raise CheckpointError(f"cannot import {t.diffusers_path} as a teacher: {err}") from None
    if cfg.distill.start_steps > chain.num_timesteps:
        raise CheckpointError(f"distill.start_steps ({cfg.distill.start_steps}) exceeds the {chain.num_timesteps} "
                              f"timesteps {t.diffusers_path} was trained on")
    return source, chain


def read_teacher(cfg: Config) -> tuple[DiffusersUNet, DiscreteChain, dict[str, Any]]:
    """(backbone with loaded weights, its discrete chain, its plain UNet config), after every check."""
    t = cfg.teacher
    source, chain = check_source(cfg)
    import diffusers
    try:
        unet = diffusers.UNet2DModel.from_pretrained(source.path, subfolder=source.unet_subfolder,
                                                     local_files_only=t.diffusers_local_only, use_safetensors=True)
    except OSError as err:
        raise CheckpointError(f"cannot load the UNet weights of {t.diffusers_path} as safetensors ({err}); raypd "
                              "never unpickles weights: save the model with safe_serialization=True") from None
    return DiffusersUNet(unet, chain.betas), chain, _plain_config(unet.config)


def import_teacher(cfg: Config, out: str | Path) -> Path:
    """Write the diffusers model ``cfg.teacher.diffusers_path`` names as a raypd teacher checkpoint at ``out``."""
    backbone, chain, unet_config = read_teacher(cfg)
    model = dataclasses.replace(cfg.model, backbone="diffusers", diffusers_unet=unet_config,
                                diffusers_betas=chain.betas, parameterization=chain.parameterization)
    diffusion = dataclasses.replace(cfg.diffusion, schedule="discrete", discrete_betas=chain.betas)
    teacher_cfg = dataclasses.replace(cfg, model=model, diffusion=diffusion)
    meta = meta_for(teacher_cfg, kind="teacher", sampling_steps=cfg.teacher.sampling_steps, round=None)
    return save_checkpoint(out, Denoiser(backbone, chain.parameterization).eval(), meta)


def run_config(cfg: Config, teacher: CheckpointMeta, path: str | Path) -> Config:
    """The configuration the rounds run under with this imported teacher.

    The teacher fixes the network (its UNet2DModel config) and the noise schedule (its discrete
    chain); the students read their output as ``teacher.diffusers_student_parameterization``.
    Everything else (data, rounds, evaluation, cluster) stays the user's.
    """
    if teacher.model.backbone != "diffusers":
        raise CheckpointError(f"{path} is not an imported diffusers teacher (backbone {teacher.model.backbone!r})")
    problems = [f"data.{k} is {getattr(teacher.data, k)} in the teacher, {getattr(cfg.data, k)} in the config"
                for k in ("resolution", "channels", "num_classes") if getattr(teacher.data, k) != getattr(cfg.data, k)]
    if problems:
        raise CheckpointError(f"the imported teacher {path} does not fit this config: " + "; ".join(problems))
    steps = len(teacher.discrete_betas)
    if cfg.distill.start_steps > steps:
        raise CheckpointError(f"distill.start_steps ({cfg.distill.start_steps}) exceeds the {steps} timesteps the "
                              "teacher was trained on; its steps would fall between the noise levels it knows")
    model = dataclasses.replace(teacher.model, parameterization=cfg.teacher.diffusers_student_parameterization)
    diffusion = dataclasses.replace(cfg.diffusion, schedule=teacher.schedule, discrete_betas=teacher.discrete_betas,
                                    logsnr_min=teacher.logsnr_min, logsnr_max=teacher.logsnr_max)
    try:  # through the validating builder: the workers rebuild it from this same dict
        return config_from_dict(dataclasses.replace(cfg, model=model, diffusion=diffusion).to_dict())
    except ConfigError as err:
        raise CheckpointError(f"the imported teacher {path} does not fit this config: {err}") from None
