"""A method's stage run in process on a tiny UNet, as the resume tests of the methods run it."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from raypd.checkpoint import meta_for, save_checkpoint
from raypd.data.prepare import training_shards
from raypd.methods import objective_for
from raypd.train.runner import InProcessRunner
from raypd.train.stage import Stage
from tests.teachers import perturbed_denoiser

TINY = ["data.resolution=8", "model.attn_resolutions=[4]", "model.ch=32", "model.ch_mult=[1,2]",
        "distill.batch_size=8", "data.loader_workers=0", "run.device=cpu", "dist.checkpoint_every=4"]
"""A UNet and batch small enough for a stage of a few updates in seconds, checkpointed every 4."""


def teacher_and_shards(cfg, root: Path, sampling_steps: int) -> tuple[str, tuple[str, ...]]:
    """A perturbed teacher checkpoint and the run's training shards under ``root``."""
    teacher = root / "teacher"
    save_checkpoint(teacher, perturbed_denoiser(cfg), meta_for(cfg, kind="teacher", sampling_steps=sampling_steps,
                                                               round=None))
    return str(teacher), training_shards(cfg.data, root / "data", seed=cfg.run.seed)


def run_stage(cfg, root: Path, stage: Stage) -> tuple[dict[str, torch.Tensor], dict]:
    """``stage`` run in process under ``root`` (its checkpoints in ``root/local``): the student and its meta."""
    InProcessRunner(cfg, root / "local", torch.device("cpu"),
                    objectives=lambda stage: objective_for(cfg, stage)).run(stage, root / "out")
    return load_file(str(root / "out" / "model.safetensors")), json.loads((root / "out" / "meta.json").read_text())
