"""What a stage trains, and with what: built the same way whichever engine then drives it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raypd.checkpoint import load_checkpoint
from raypd.config import Config
from raypd.models import Denoiser, build_denoiser
from raypd.train.engine import PlainEngine, build_plain_engine
from raypd.train.lr import LrSchedule, linear_decay, warmup
from raypd.train.rounds import freeze, make_student
from raypd.train.stage import Stage


@dataclass
class StageSetup:
    model: Denoiser
    """The network to train: a fresh one for the teacher, the teacher's copy for a student."""
    teacher: Denoiser | None
    lr: float
    betas: tuple[float, float]
    schedule: LrSchedule
    ema_decay: float | None
    batch_size: int
    """The global batch (all ranks together)."""
    grad_clip: float
    embedding_lr_factor: float = 1.0
    """The learning rate of a w-conditioned student's w embedding, as a multiple of ``lr`` (a guided first stage)."""


def prepare_stage(cfg: Config, stage: Stage, device: torch.device) -> StageSetup:
    """The model, its teacher and the optimizer settings of ``stage``; the same initial weights on every rank."""
    torch.manual_seed(cfg.run.seed)
    if not stage.distills:
        t = cfg.teacher
        model = build_denoiser(cfg.model, cfg.data).to(device).train()
        if cfg.dist.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        return StageSetup(model, None, t.lr, t.adam_betas, warmup(t.warmup_updates), t.ema_decay, t.batch_size,
                          t.grad_clip)
    teacher = freeze(load_checkpoint(stage.teacher, map_location=device)[0])
    s = cfg.distill
    model = make_student(teacher, cfg.model.parameterization, guidance_input=s.guided)
    if cfg.dist.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    # a guided first stage has its own rate, and a faster one for the w embedding
    return StageSetup(model, teacher, s.stage_lr(stage.guidance), s.adam_betas, linear_decay(stage.updates), None,
                      s.batch_size, s.grad_clip, s.guidance_embedding_lr_factor if stage.guidance else 1.0)


def plain_engine(setup: StageSetup, world: int = 1) -> PlainEngine:
    """The in-process engine for a stage (one rank)."""
    if world != 1:
        raise ValueError("the plain-PyTorch engine runs on one rank; several ranks run DeepSpeed")
    return build_plain_engine(setup.model, lr=setup.lr, betas=setup.betas, grad_clip=setup.grad_clip,
                              schedule=setup.schedule, ema_decay=setup.ema_decay,
                              embedding_lr_factor=setup.embedding_lr_factor)
