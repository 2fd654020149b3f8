"""What a stage trains and how: the interface the training loop drives, whatever the method.

A stage trains one or more networks, its *roles* (a student; a critic or a discriminator beside it), each
with its own optimizer, learning rate and schedule, clipping, optional EMA, precision and update ratio. Beside
them it keeps frozen networks (the teacher) and *averages*: frozen EMAs of a trained role (a self-teacher, a
stop-gradient target network) that are updated after each of that role's steps and kept
in every checkpoint. An ``Objective`` says, for one stage, how all of that is built and what each role's loss is
on one batch; the loop (``raypd.train.stage_loop``) does the rest identically for every method.

Teacher training is the objective of this module: the denoising loss (Algorithm 1) with label dropout. The
distillation methods' objectives live in ``raypd.methods``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Mapping, Protocol

import torch
from torch import Tensor, nn

from raypd.config import Config
from raypd.data.batch import Batch
from raypd.diffusion import diffuse, weighted_mse
from raypd.models import build_denoiser
from raypd.models.build import null_class
from raypd.models.denoiser import forward_dtype
from raypd.train.lr import LrSchedule, warmup, warmup_then_decay

Nets = Mapping[str, nn.Module]
"""Every network of a stage by name: the trained roles (as their engines call them), the frozen networks and the
averages."""


@dataclass
class Role:
    """One trained network of a stage and how it is optimised."""
    model: nn.Module
    lr: float
    betas: tuple[float, float]
    schedule: LrSchedule
    grad_clip: float
    ema_decay: float | None = None
    """An EMA of the weights, kept by the engine and handed on instead of the weights (teacher training)."""
    embedding_lr_factor: float = 1.0
    """The learning rate of a w-conditioned network's w embedding, as a multiple of ``lr``."""
    every: int = 1
    """The role steps on the stage's updates k with k % every == 0 (a student every 5th update, its critic at each)."""
    precision: str | None = None
    """The engine's precision on DeepSpeed workers (``fp32``, ``bf16``, ``fp16``); None: the stage's
    ``dist.precision``. The in-process engine trains in fp32."""


@dataclass
class Average:
    """A frozen average of trained role ``of``'s weights, updated after each of its finite steps and checkpointed."""
    of: str
    decay: float
    bias_corrected: bool = True


@dataclass
class StageSetup:
    """What a stage trains, and with what; built the same way whichever engine then drives it."""
    roles: dict[str, Role]
    """The trained networks in the order they step within an update; the first is the one the stage hands on."""
    batch_size: int
    """The global batch (all ranks together)."""
    frozen: dict[str, nn.Module] = field(default_factory=dict)
    averages: dict[str, Average] = field(default_factory=dict)

    @property
    def main(self) -> str:
        return next(iter(self.roles))

    def __post_init__(self):
        if not self.roles:
            raise ValueError("a stage trains at least one role")
        names = [*self.roles, *self.frozen, *self.averages]
        if len(set(names)) != len(names):
            raise ValueError(f"a stage's networks need distinct names, got {names}")
        for name, role in self.roles.items():
            if role.every < 1:
                raise ValueError(f"role {name}: every must be >= 1, got {role.every}")
        for name, average in self.averages.items():
            if average.of not in self.roles:
                raise ValueError(f"average {name} follows {average.of!r}, which is not a trained role")


class Objective(Protocol):
    """One stage's networks and losses, as the training loop needs them."""

    reads_pairs: bool
    """Whether the stage reads (noise, teacher sample) pairs rather than images."""

    def setup(self, device: torch.device) -> StageSetup:
        """The stage's networks and optimizer settings; the same initial weights on every rank."""
        ...

    def loss(self, role: str, nets: Nets, batch: Batch, generator: torch.Generator, update: int) -> Tensor:
        """Role ``role``'s mean loss on ``batch`` at the stage's update ``update`` (1 .. stage.updates, the same
        number on every rank and after a resume: a curriculum or a warm-up reads it); every random draw comes
        from ``generator``."""
        ...

    def make_heldout(self, batch: Batch, seed: int) -> dict[str, Tensor]:
        """A sweep's fixed held-out set for this stage: ``batch`` with its noise, times (...) drawn once from
        ``seed``."""
        ...

    def heldout_losses(self, nets: Nets, part: dict[str, Tensor]) -> Tensor:
        """The main role's per-example loss on a slice of a fixed held-out set (``raypd.train.heldout``)."""
        ...


def drop_labels(y: Tensor, p: float, null: int, generator: torch.Generator | None) -> Tensor:
    """Label dropout: each label replaced by the "no class" label with probability ``p``."""
    dropped = torch.rand(y.shape[0], generator=generator, device=y.device) < p
    return torch.where(dropped, torch.full_like(y, null), y)


def denoising_loss(model: nn.Module, batch: Batch, *, weighting, logsnr_fn, generator: torch.Generator | None = None,
                   class_dropout: float = 0.0, null: int | None = None) -> Tensor:
    """Algorithm 1: the mean weighted x-space loss at t ~ U(0, 1), the data as target; with ``class_dropout``
    that share of the labels is replaced by the ``null`` ("no class") label first."""
    x, y = batch.x, batch.y
    eps = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    t = torch.rand(x.shape[0], generator=generator, dtype=x.dtype, device=x.device)
    if class_dropout > 0 and y is not None:
        if null is None:
            raise ValueError("label dropout needs the network's 'no class' label (null_class)")
        y = drop_labels(y, class_dropout, null, generator)
    logsnr_t = logsnr_fn(t)
    x_hat = model(diffuse(x, eps, logsnr_t), logsnr_t, y)
    return weighted_mse(x_hat.float(), x.float(), logsnr_t, weighting).mean()


@contextlib.contextmanager
def frozen_forward(z: Tensor, dtype: torch.dtype | None):
    """How frozen networks run: no autograd, in their forward dtype (``dist.teacher_dtype``)."""
    autocast = torch.autocast(z.device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    with torch.inference_mode(), autocast:
        yield


def frozen_dtype(choice: str, device: torch.device) -> torch.dtype | None:
    """The frozen networks' forward dtype (``dist.teacher_dtype``): ``auto`` is bf16 on GPUs that have it.

    Only the network runs in it: the Denoiser returns x_hat in the dtype of z (fp32), so DDIM steps and
    inversions to a target, which divide by small differences, stay fp32."""
    return forward_dtype(choice, device)


class TeacherTraining:
    """The teacher stage: a fresh network trained by the denoising loss, handed on as its EMA."""

    reads_pairs = False

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.logsnr_fn = cfg.diffusion.logsnr_fn()

    def setup(self, device: torch.device) -> StageSetup:
        torch.manual_seed(self.cfg.run.seed)
        t = self.cfg.teacher
        model = build_denoiser(self.cfg.model, self.cfg.data).to(device).train()
        if self.cfg.dist.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        schedule = (warmup(t.warmup_updates) if t.lr_decay == "constant"
                    else warmup_then_decay(t.warmup_updates, t.updates))
        role = Role(model, t.lr, t.adam_betas, schedule, t.grad_clip, ema_decay=t.ema_decay)
        return StageSetup({"teacher": role}, t.batch_size)

    def loss(self, role: str, nets: Nets, batch: Batch, generator: torch.Generator, update: int) -> Tensor:
        m = self.cfg.model
        return denoising_loss(nets[role], batch, weighting=self.cfg.diffusion.weighting, logsnr_fn=self.logsnr_fn,
                              generator=generator, class_dropout=m.class_dropout,
                              null=null_class(m, self.cfg.data) if m.class_dropout > 0 else None)

    def make_heldout(self, batch: Batch, seed: int) -> dict[str, Tensor]:
        raise ValueError("teacher training has no held-out set: sweeps search distillation stages")

    def heldout_losses(self, nets: Nets, part: dict[str, Tensor]) -> Tensor:
        raise ValueError("teacher training has no held-out set: sweeps search distillation stages")
