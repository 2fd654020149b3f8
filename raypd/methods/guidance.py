"""Guided distillation (Meng et al. 2023) as a modifier of the methods that allow it.

A guided run first trains a student that takes the classifier-free guidance weight w as an input to match the
teacher's guided prediction (1 + w) x_hat(z, c) - w x_hat(z, no class) at t ~ U(0, 1) (the *guidance* phase), then
distils that w-conditioned student by the method's own stages, every example at a w of its own and every teacher
step at it. This module is everything guidance adds: the w draw, the first stage's round and objective, its
learning rates and its loss weighting.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from raypd.config import DistillConfig
from raypd.methods.regression import Regression
from raypd.train.objective import Nets, Role
from raypd.train.rounds import Round

PHASE = "guidance"
"""The phase name of the guided first stage (``Stage.phase``, ``Round.phase``)."""


@dataclass(frozen=True)
class Guidance:
    """The w draw: ``endpoints`` of the examples at the ends of [low, high] (half each), the rest ~ U(low, high);
    the first stage's loss power, its w embedding's rate multiple and its updates (its learning rate is
    ``distill.guidance_lr``: ``raypd.methods.Method.lr_key``)."""
    low: float
    high: float
    endpoints: float = 0.0
    loss_power: float = 0.0
    embedding_lr_factor: float = 1.0
    updates: int = 1

    @classmethod
    def of(cls, d: DistillConfig) -> "Guidance | None":
        """The run's guidance (None: the distillation is not guided)."""
        if not d.guided:
            return None
        return cls(d.guidance_min, d.guidance_max, d.guidance_endpoints, d.guidance_loss_power,
                   d.guidance_embedding_lr_factor, d.guidance_updates)

    def draw(self, batch: int, generator: torch.Generator | None, device) -> Tensor:
        u = torch.rand(batch, generator=generator, dtype=torch.float32, device=device)
        w = self.low + (self.high - self.low) * u
        if self.endpoints > 0:
            e = torch.rand(batch, generator=generator, dtype=torch.float32, device=device)
            w = torch.where(e < self.endpoints / 2, self.low, torch.where(e < self.endpoints, self.high, w))
        return w

    def loss_weight(self, w: Tensor) -> Tensor | None:
        """The first stage's per-example factor (1 + w)^-loss_power (None: all 1)."""
        return None if self.loss_power == 0 else (1 + w) ** -self.loss_power

    def first_round(self, steps: int) -> Round:
        """The first stage: the w-conditioned student, sampling in the rounds' first ``steps``."""
        return Round(0, steps, steps, self.updates, phase=PHASE)


class FirstStage(Regression):
    """The guidance phase: the w-conditioned student onto the teacher's guided x_hat at t ~ U(0, 1), its w
    embedding (which starts at zero and has everything to learn) at a multiple of the stage's rate."""

    def student_role(self, model) -> Role:
        role = super().student_role(model)
        role.embedding_lr_factor = self.guidance.embedding_lr_factor
        return role

    def times(self, b: int, generator: torch.Generator | None, like: Tensor) -> Tensor:
        return torch.rand(b, generator=generator, dtype=like.dtype, device=like.device)

    def target(self, nets: Nets, z_t: Tensor, t: Tensor, y: Tensor | None, w: Tensor | None) -> Tensor:
        if w is None:
            raise ValueError("the guided target needs guidance weights w")
        return nets["teacher"].guided(z_t, self.logsnr_fn(t), y, w)

    def scale(self, w: Tensor | None) -> Tensor | None:
        return None if w is None else self.guidance.loss_weight(w)
