"""ONE training step for teacher training and for distillation.

Without a teacher: t ~ U(0, 1) and the target is the data (Algorithm 1).
With a teacher: t on the student's N-step grid and the target is x_tilde (Algorithm 2); with a
self-teacher too, TRACT: t on the teacher's T-step grid and the target is the inverted jump to the end of
t's segment. A batch of pairs (noise z and the teacher's sample x from it) is the Denoising Student's
regression at t = 1. Guided distillation draws a guidance weight w per example: its first stage regresses the
w-conditioned student onto the teacher's guided x_hat at t ~ U(0, 1), its rounds use the teacher's steps at the
same w. Everything else, the forward process, the student's x_hat and the weighted loss, is shared.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor

from raypd.diffusion import diffuse, distill_target, student_times, tract_target, weighted_mse
from raypd.diffusion.ddim import LogsnrFn
from raypd.diffusion.loss import Weighting
from raypd.config import DistillConfig
from raypd.data.batch import Batch
from raypd.models import Denoiser
from raypd.models.denoiser import forward_dtype
from raypd.train.engine import Engine


@dataclass(frozen=True)
class Guidance:
    """A guided distillation step: w per example, ``endpoints`` of them at the ends of [low, high] (half each) and
    the rest ~ U(low, high); ``first_stage``: the target is the teacher's guided x_hat itself at t ~ U(0, 1)
    (else the round's two-step target, every teacher step at w); ``loss_power``: the first stage scales each
    example's loss by (1 + w)^-loss_power."""
    low: float
    high: float
    first_stage: bool = False
    endpoints: float = 0.0
    loss_power: float = 0.0

    def draw(self, batch: int, generator: torch.Generator | None, device) -> Tensor:
        u = torch.rand(batch, generator=generator, dtype=torch.float32, device=device)
        w = self.low + (self.high - self.low) * u
        if self.endpoints > 0:
            e = torch.rand(batch, generator=generator, dtype=torch.float32, device=device)
            w = torch.where(e < self.endpoints / 2, self.low, torch.where(e < self.endpoints, self.high, w))
        return w

    def loss_weight(self, w: Tensor) -> Tensor | None:
        """Per-example factor on the loss at guidance weights ``w`` (None: all 1)."""
        if not self.first_stage or self.loss_power == 0:
            return None
        return (1 + w) ** -self.loss_power


def guidance_for(cfg: DistillConfig, first_stage: bool) -> Guidance | None:
    """The w draw of a distillation stage under these settings (None: the distillation is not guided)."""
    if not cfg.guided:
        return None
    return Guidance(cfg.guidance_min, cfg.guidance_max, first_stage, cfg.guidance_endpoints, cfg.guidance_loss_power)


def drop_labels(y: Tensor, p: float, null_class: int, generator: torch.Generator | None) -> Tensor:
    """Label dropout: each label replaced by the "no class" label with probability ``p``."""
    dropped = torch.rand(y.shape[0], generator=generator, device=y.device) < p
    return torch.where(dropped, torch.full_like(y, null_class), y)


@dataclass
class StepStats:
    loss: float
    grad_norm: float
    lr: float


def diffusion_loss(
    student: Denoiser, batch: Batch, *, weighting: Weighting, logsnr_fn: LogsnrFn,
    teacher: Denoiser | None = None, n_steps: int | None = None,
    generator: torch.Generator | None = None, teacher_dtype: torch.dtype | None = None,
    self_teacher: Denoiser | None = None, teacher_steps: int | None = None,
    guidance: Guidance | None = None, class_dropout: float = 0.0, null_class: int | None = None,
) -> Tensor:
    """Mean weighted x-space loss of the student on one batch, at freshly drawn noise and times (a batch of pairs
    brings its own noise: no teacher is called). Teacher training with ``class_dropout`` replaces that share of
    the labels by ``null_class``; a guided distillation draws w per example (``guidance``)."""
    if batch.z is not None:
        return pair_loss_at(student, batch.x, batch.z, batch.y, weighting=weighting, logsnr_fn=logsnr_fn).mean()
    x, y = batch.x, batch.y
    b = x.shape[0]
    eps = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    if teacher is None:
        t = torch.rand(b, generator=generator, dtype=x.dtype, device=x.device)
        if class_dropout > 0 and y is not None:
            if null_class is None:
                raise ValueError("label dropout needs the network's 'no class' label (null_class)")
            y = drop_labels(y, class_dropout, null_class, generator)
    elif guidance is not None and guidance.first_stage:
        t = torch.rand(b, generator=generator, dtype=x.dtype, device=x.device)
    else:
        if n_steps is None:
            raise ValueError("distillation needs n_steps, the student's sampling step count")
        grid = n_steps if self_teacher is None else _teacher_grid(teacher_steps)
        t = student_times(b, grid, generator=generator, dtype=x.dtype, device=x.device)
    w = None if guidance is None or teacher is None else guidance.draw(b, generator, x.device)
    loss = loss_at(student, x, eps, t, y, weighting=weighting, logsnr_fn=logsnr_fn, teacher=teacher,
                   n_steps=n_steps, teacher_dtype=teacher_dtype, self_teacher=self_teacher,
                   teacher_steps=teacher_steps, w=w, guided_target=guidance is not None and guidance.first_stage)
    scale = None if w is None else guidance.loss_weight(w)
    return (loss if scale is None else loss * scale.to(loss.dtype)).mean()


def _teacher_grid(teacher_steps: int | None) -> int:
    if teacher_steps is None:
        raise ValueError("TRACT needs teacher_steps, the phase's teacher sampling step count")
    return teacher_steps


def loss_at(student: Denoiser, x: Tensor, eps: Tensor, t: Tensor, y: Tensor | None, *, weighting: Weighting,
            logsnr_fn: LogsnrFn, teacher: Denoiser | None = None, n_steps: int | None = None,
            teacher_dtype: torch.dtype | None = None, self_teacher: Denoiser | None = None,
            teacher_steps: int | None = None, w: Tensor | None = None, guided_target: bool = False) -> Tensor:
    """Per-example weighted x-space loss at given noise ``eps`` and times ``t``: the data as target without a
    teacher (Algorithm 1), the teacher's two-step target x_tilde with one (Algorithm 2), TRACT's target with a
    self-teacher as well (``t`` then on the ``teacher_steps`` grid). With guidance weights ``w`` the student is
    w-conditioned and the teacher steps at w; ``guided_target``: the target is the teacher's guided x_hat at t."""
    logsnr_t = logsnr_fn(t)
    z_t = diffuse(x, eps, logsnr_t)
    if teacher is None:
        target = x
    elif guided_target:
        if w is None:
            raise ValueError("the guided target needs guidance weights w")
        with _teacher_mode(z_t, teacher_dtype):
            target = teacher.guided(z_t, logsnr_t, y, w)
        target = target.to(z_t.dtype).clone()
    else:
        target = _teacher_target(teacher, z_t, t, n_steps, y, logsnr_fn, teacher_dtype, self_teacher,
                                 teacher_steps, w)
    x_hat = student(z_t, logsnr_t, y) if w is None else student(z_t, logsnr_t, y, w)
    return weighted_mse(x_hat.float(), target.float(), logsnr_t, weighting)


def pair_loss_at(student: Denoiser, x: Tensor, z: Tensor, y: Tensor | None, *, weighting: Weighting,
                 logsnr_fn: LogsnrFn) -> Tensor:
    """Per-example loss of the Denoising Student: one step from the noise z (as z_1) onto the teacher's sample x."""
    logsnr_1 = logsnr_fn(torch.ones(z.shape[0], dtype=z.dtype, device=z.device))
    x_hat = student(z, logsnr_1, y)
    return weighted_mse(x_hat.float(), x.float(), logsnr_1, weighting)


def teacher_autocast_dtype(choice: str, device: torch.device) -> torch.dtype | None:
    """The frozen teacher's forward dtype (``dist.teacher_dtype``): ``auto`` is bf16 on GPUs that have it.

    Only the network runs in it: the Denoiser returns x_hat in the dtype of z (fp32), so the DDIM
    steps and the inversion to the target, which divides by small differences, stay fp32."""
    return forward_dtype(choice, device)


def _teacher_target(teacher: Denoiser, z_t: Tensor, t: Tensor, n_steps: int, y: Tensor | None,
                    logsnr_fn: LogsnrFn, teacher_dtype: torch.dtype | None, self_teacher: Denoiser | None = None,
                    teacher_steps: int | None = None, w: Tensor | None = None) -> Tensor:
    def bound(model):
        return model.bind(y) if w is None else model.bind(y, w)

    with _teacher_mode(z_t, teacher_dtype):
        if self_teacher is None:
            target = distill_target(bound(teacher), z_t, t, n_steps, logsnr_fn=logsnr_fn)
        else:
            target = tract_target(bound(teacher), bound(self_teacher), z_t, t, _teacher_grid(teacher_steps),
                                  n_steps, logsnr_fn=logsnr_fn)
    # an inference tensor cannot enter autograd; a copy made outside inference mode can
    return target.to(z_t.dtype).clone()


@contextlib.contextmanager
def _teacher_mode(z_t: Tensor, teacher_dtype: torch.dtype | None):
    """No autograd, and the teacher's forward dtype."""
    autocast = (torch.autocast(z_t.device.type, dtype=teacher_dtype) if teacher_dtype is not None
                else contextlib.nullcontext())
    with torch.inference_mode(), autocast:
        yield


def train_step(
    engine: Engine, batch: Batch, *, weighting: Weighting, logsnr_fn: LogsnrFn,
    teacher: Denoiser | None = None, n_steps: int | None = None,
    generator: torch.Generator | None = None, teacher_dtype: torch.dtype | None = None,
    self_teacher: Denoiser | None = None, teacher_steps: int | None = None,
    guidance: Guidance | None = None, class_dropout: float = 0.0, null_class: int | None = None,
) -> StepStats:
    """Loss, backward and one optimizer update through the engine."""
    loss = diffusion_loss(engine.model, batch, weighting=weighting, logsnr_fn=logsnr_fn, teacher=teacher,
                          n_steps=n_steps, generator=generator, teacher_dtype=teacher_dtype,
                          self_teacher=self_teacher, teacher_steps=teacher_steps, guidance=guidance,
                          class_dropout=class_dropout, null_class=null_class)
    engine.backward(loss)
    grad_norm, lr = engine.step()
    return StepStats(loss=loss.item(), grad_norm=grad_norm, lr=lr)
