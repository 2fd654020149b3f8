"""A two-role method registered from the tests: a student and a critic, each trained by its own optimizer.

Until a real two-role method ships, this one exercises roles end to end: the critic (a copy of the teacher) fits
the student's predictions of the data with the denoising loss at every update; the student steps every
``every``-th update on progressive distillation's target plus the critic's reconstruction of its own prediction,
so its gradient flows through the critic's forward into its own weights, never into the critic's. Both roles see
the data, so a non-finite batch stops both, and they roll back together.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from raypd.config import ConfigError
from raypd.data.batch import Batch
from raypd.diffusion import diffuse, weighted_mse
from raypd.methods import Method, register
from raypd.methods.progressive import HalvingRound, Progressive
from raypd.train.lr import linear_decay
from raypd.train.objective import Nets, Role, StageSetup
from raypd.train.rounds import make_student
from raypd.train.stage import Stage


@dataclass(frozen=True)
class CriticOptions:
    every: int = 2
    """The student steps on every ``every``-th update; the critic on every one."""
    lr: float = 1e-3
    """The critic's learning rate, decayed linearly to 0 over the stage."""
    weight: float = 0.5
    """The critic's term in the student's loss."""
    precision: str = ""
    """The critic's engine precision on DeepSpeed workers (empty: the stage's ``dist.precision``)."""

    def validate(self) -> None:
        if self.every < 1:
            raise ConfigError("every", f"must be >= 1, got {self.every}")
        if self.precision not in ("", "fp32", "bf16"):
            raise ConfigError("precision", f"must be '', fp32 or bf16, got {self.precision!r}")


class CriticRound(HalvingRound):
    def setup(self, device: torch.device) -> StageSetup:
        setup = super().setup(device)
        o, d, student = self.method.options, self.cfg.distill, setup.roles["student"]
        student.every = o.every
        student.schedule = linear_decay(max(1, self.stage.updates // o.every))
        critic = make_student(setup.frozen["teacher"])
        setup.roles["critic"] = Role(critic, o.lr, d.adam_betas, linear_decay(self.stage.updates), d.grad_clip,
                                     precision=o.precision or None)
        return setup

    def predictions(self, student, batch: Batch, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """The student's prediction of the data at a random noise level, and that level's logsnr."""
        x, b = batch.x, batch.x.shape[0]
        eps = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        logsnr = self.logsnr_fn(torch.rand(b, generator=generator, dtype=x.dtype, device=x.device))
        return student(diffuse(x, eps, logsnr), logsnr, batch.y), logsnr

    def loss(self, role: str, nets: Nets, batch: Batch, generator: torch.Generator, update: int) -> Tensor:
        if role == "critic":
            with torch.no_grad():  # the student's predictions as data: no gradient to it in the critic's turn
                fake, _ = self.predictions(nets["student"], batch, generator)
            fake = fake.float().clone()
            eps = torch.randn(fake.shape, generator=generator, dtype=fake.dtype, device=fake.device)
            logsnr = self.logsnr_fn(torch.rand(fake.shape[0], generator=generator, device=fake.device))
            x_hat = nets["critic"](diffuse(fake, eps, logsnr), logsnr, batch.y)
            return weighted_mse(x_hat.float(), fake, logsnr, self.weighting).mean()
        regression = super().loss(role, nets, batch, generator, update)
        fake, logsnr = self.predictions(nets["student"], batch, generator)
        eps = torch.randn(fake.shape, generator=generator, dtype=fake.dtype, device=fake.device)
        seen = nets["critic"](diffuse(fake.float(), eps, logsnr), logsnr, batch.y)
        return regression + self.method.options.weight * (seen.float() - fake.float()).square().mean()


@register
class CriticMethod(Method):
    name = "critic_test"
    title = "a student with a critic (test method)"
    Options = CriticOptions
    guidable = False

    def step_counts(self) -> list[int]:
        return Progressive.step_counts(self)

    def forwards_per_example(self) -> int:
        """The regression's 5, the student's prediction and the critic's forward and backward in its loss (4),
        the critic's update on a prediction (1 + 3)."""
        return 5 + 4 + 4

    def stage_objective(self, stage: Stage) -> CriticRound:
        return CriticRound(self, stage)
