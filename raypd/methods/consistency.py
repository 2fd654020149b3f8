"""Consistency distillation (Song et al. 2023) and multistep consistency distillation (Heek, Hoogeboom, Salimans
2024), as one method: ``distill.consistency.segments`` S = 1 is the original consistency model, more is the
multistep one.

In raypd's notation the student is a network x_hat(z_t, t) on the run's schedule. Time [0, 1] is cut into S
segments; the teacher's grid has T steps (a multiple of S). Per example: t on the T-step grid, z_t = alpha_t x +
sigma_t eps; the frozen teacher takes one DDIM step t -> t - 1/T; a stop-gradient *target network* (an EMA of the
student, or with ``target_ema = 0`` the student itself as in iCT and the multistep paper) maps that point to the
start s of t's segment by one DDIM jump; the target is the x whose one DDIM step from z_t lands there (the inversion
of Algorithm 2). At s = 0 the jump returns the target network's x_hat itself, which is the consistency model's
target sg(f(z_{t-1/T}, t - 1/T)). The target is TRACT's (``raypd.diffusion.tract_target``) with a target network for
the self-teacher; what differs is the grid's curriculum, the distance and the sampler.

The boundary condition f(z, 0) = z / alpha_0 is met by the parameterization: at t = 0 (logsnr = logsnr_max) eps-, v-
and both-parameterized networks return x_hat = (z - sigma_0 eps_hat) / alpha_0 with sigma_0 = e^-10 (for logsnr_max
20), so any output moves it by at most 4.5e-5 times its size. An x-parameterized network does not meet it and is
refused.

Where the published recipes differ from raypd's: they start sampling at EDM's s = 80 (t = 0.992) on Karras' grid,
raypd's samplers and grids at t = 1 on the run's own schedule; the loss keeps the run's x-space weighting
(``diffusion.weighting``); LPIPS is not offered (its backbone's weights are downloaded at run time).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from raypd.config import ConfigError
from raypd.data.batch import Batch
from raypd.diffusion import loss_weight, tract_target
from raypd.methods.base import Method, register
from raypd.methods.regression import Regression, bound
from raypd.train.objective import Average, Nets
from raypd.train.stage import Stage

TARGET = "target"
"""The name of the stop-gradient target network (an average of the student) in a consistency stage."""


@dataclass(frozen=True)
class ConsistencyOptions:
    segments: int = 1
    """S: the student's segments of [0, 1]. 1 is the original consistency model, sampled in distill.end_steps steps
    by the multistep consistency sampler; more is multistep consistency, sampled by DDIM in its S steps (then
    distill.end_steps must equal S)."""
    initial_steps: int = 0
    """The teacher grid's step count T at the stage's start: it doubles in equal parts of the stage up to
    distill.start_steps (iCT's discretization curriculum). 0: no curriculum, T = distill.start_steps throughout."""
    target_ema: float = 0.0
    """Decay of the stop-gradient target network, an EMA of the student (0: the student itself, as iCT and
    multistep consistency use; 0.95: the original consistency distillation on ImageNet 64). Kept in every
    checkpoint."""
    distance: Literal["pseudo_huber", "l2"] = "pseudo_huber"
    """pseudo_huber: sqrt(|x_hat - target|^2 + c^2) - c (iCT); l2: the squared error. Each weighted by
    diffusion.weighting. (LPIPS, the original paper's best, is not offered: its network's weights are fetched
    at run time.)"""
    huber_c: float = 0.00054
    """The pseudo-Huber constant per sqrt(dimension): c = huber_c * sqrt(C H W) (iCT's 0.00054)."""

    def validate(self) -> None:
        if self.segments < 1:
            raise ConfigError("segments", f"must be >= 1, got {self.segments}")
        if self.initial_steps < 0:
            raise ConfigError("initial_steps", f"must be >= 0 (0: no curriculum), got {self.initial_steps}")
        if not 0.0 <= self.target_ema < 1.0:
            raise ConfigError("target_ema", f"must lie in [0, 1), got {self.target_ema}")
        if self.huber_c <= 0:
            raise ConfigError("huber_c", f"must be > 0, got {self.huber_c}")


def teacher_grid(update: int, updates: int, initial: int, final: int) -> int:
    """T at update ``update`` (1 .. updates) of a stage whose grid doubles from ``initial`` to ``final`` in equal
    parts of the stage: min(initial 2^floor((update - 1) / K'), final), K' = floor(updates / (log2(final /
    initial) + 1)) (iCT's N(k), there for K total iterations)."""
    if initial >= final:
        return final
    doublings = round(math.log2(final / initial))
    part = max(1, updates // (doublings + 1))
    return min(initial * 2 ** ((max(update, 1) - 1) // part), final)


def pseudo_huber(x_hat: Tensor, target: Tensor, c_per_dim: float) -> Tensor:
    """Per example sqrt(|x_hat - target|^2 + c^2) - c with c = c_per_dim sqrt(D)."""
    c = c_per_dim * math.sqrt(x_hat[0].numel())
    squared = (x_hat - target).flatten(1).square().sum(1)
    return torch.sqrt(squared + c * c) - c


class ConsistencyStage(Regression):
    """t on the teacher's T-step grid of the current update; the target is the target network's jump, from the
    teacher's DDIM step, to the start of t's segment; the distance is pseudo-Huber or squared."""

    def __init__(self, method, stage: Stage):
        super().__init__(method, stage)
        self.options = method.options
        self.steps = stage.steps_of_teacher

    # the teacher grid follows the curriculum; the held-out set (which ranks a sweep's trials) uses the final one
    def grid_at(self, update: int) -> int:
        o = self.options
        return teacher_grid(update, self.stage.updates, o.initial_steps or self.stage.steps_of_teacher,
                            self.stage.steps_of_teacher)

    def grid(self) -> int:
        return self.steps

    def loss(self, role: str, nets: Nets, batch: Batch, generator: torch.Generator, update: int) -> Tensor:
        self.steps = self.grid_at(update)
        return super().loss(role, nets, batch, generator, update)

    def make_heldout(self, batch: Batch, seed: int) -> dict[str, Tensor]:
        self.steps = self.stage.steps_of_teacher
        return super().make_heldout(batch, seed)

    def heldout_losses(self, nets: Nets, part: dict[str, Tensor]) -> Tensor:
        self.steps = self.stage.steps_of_teacher
        return super().heldout_losses(nets, part)

    def averages(self) -> dict[str, Average]:
        return {TARGET: Average("student", self.options.target_ema, bias_corrected=False)}

    def target(self, nets: Nets, z_t: Tensor, t: Tensor, y: Tensor | None, w: Tensor | None) -> Tensor:
        return tract_target(bound(nets["teacher"], y, w), bound(nets[TARGET], y, w), z_t, t, self.steps,
                            self.options.segments, logsnr_fn=self.logsnr_fn)

    def distance(self, x_hat: Tensor, target: Tensor, logsnr_t: Tensor) -> Tensor:
        weight = loss_weight(logsnr_t, self.weighting).float()
        if self.options.distance == "pseudo_huber":
            return weight * pseudo_huber(x_hat, target, self.options.huber_c)
        return weight * (x_hat - target).flatten(1).square().mean(1)


@register
class Consistency(Method):
    name = "consistency"
    title = "consistency distillation"
    about = ("Distilled to a consistency model: the student maps each point of its segment of the teacher's ODE "
             "to the segment's start, learnt from the teacher's DDIM step and a stop-gradient target network.")
    Options = ConsistencyOptions

    @classmethod
    def read_options(cls, cfg):
        if cfg.distill.options.get(cls.name, {}).get("distance") == "lpips":
            raise ConfigError("distill.consistency.distance", "LPIPS needs a pretrained VGG or AlexNet whose weights "
                              "are downloaded at run time, which raypd does not do on a cluster's workers; use "
                              "pseudo_huber (iCT's replacement for it) or l2")
        return super().read_options(cfg)

    @property
    def sampler(self) -> str:
        """One segment: the multistep consistency sampler; more: DDIM on the segments' grid."""
        return "consistency" if self.options.segments == 1 else "ddim"

    def check(self) -> None:
        d, o = self.distill, self.options
        if o.segments > 1 and d.end_steps != o.segments:
            raise ConfigError("distill.end_steps", f"a multistep consistency student samples in its segments "
                              f"(distill.consistency.segments={o.segments}): set distill.end_steps={o.segments}, "
                              f"got {d.end_steps}")
        initial = o.initial_steps or d.start_steps
        ratio = d.start_steps / initial
        if initial > d.start_steps or ratio != 2 ** round(math.log2(ratio)):
            raise ConfigError("distill.consistency.initial_steps",
                              f"the curriculum doubles the teacher's grid up to distill.start_steps "
                              f"({d.start_steps}): initial_steps must be it divided by a power of two, got {initial}")
        doublings = round(math.log2(ratio))
        short = [r for r in self.plan() if r.phase != "guidance" and r.updates < doublings + 1]
        if short:
            raise ConfigError("distill.consistency.initial_steps",
                              f"the curriculum doubles the grid {doublings} times from {initial} steps, in equal "
                              f"parts of the stage, but the stage has {short[0].updates} updates; raise "
                              "distill.updates_per_round or initial_steps")
        if initial % o.segments:
            raise ConfigError("distill.consistency.segments",
                              f"{o.segments} segments do not divide the teacher's {initial}-step grid; choose "
                              f"segments dividing {initial} (or a larger distill.consistency.initial_steps)")
        student = self.cfg.teacher.diffusers_student_parameterization if self.cfg.model.backbone == "diffusers" \
            else self.cfg.model.parameterization
        if student == "x":
            key = "teacher.diffusers_student_parameterization" if self.cfg.model.backbone == "diffusers" \
                else "model.parameterization"
            raise ConfigError(key, "an x-parameterized student does not meet the consistency boundary condition "
                              "f(z, 0) = z / alpha_0; use eps, v or both")

    def step_counts(self) -> list[int]:
        return [self.distill.end_steps]

    def stage_objective(self, stage: Stage) -> ConsistencyStage:
        return ConsistencyStage(self, stage)
