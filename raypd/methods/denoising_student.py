"""The Denoising Student (Luhman & Luhman 2021): noises sampled once by the teacher's start_steps-step DDIM, and a
one-step student that learns to map each noise to its sample."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from raypd.config import ConfigError
from raypd.data.batch import Batch
from raypd.diffusion import weighted_mse
from raypd.methods.base import Method, Upfront, register
from raypd.methods.regression import Regression
from raypd.train.objective import Nets
from raypd.train.rounds import TRAIN_FORWARDS
from raypd.train.stage import Stage


@dataclass(frozen=True)
class DenoisingStudentOptions:
    pairs: int = 8192
    """(noise, teacher sample) pairs, generated once (Ray tasks with dist.workers, on GPUs with dist.use_gpu), kept
    as shards in the run and reused when it resumes."""

    def validate(self) -> None:
        if self.pairs < 1:
            raise ConfigError("pairs", f"must be >= 1, got {self.pairs}")


class PairRegression(Regression):
    """One step from the noise z (as z_1) onto the teacher's sample x of it; no teacher runs during training."""

    reads_pairs = True

    def loss(self, role: str, nets: Nets, batch: Batch, generator: torch.Generator, update: int) -> Tensor:
        return self.pair_losses(nets, batch.x, batch.z, batch.y).mean()

    def pair_losses(self, nets: Nets, x: Tensor, z: Tensor, y: Tensor | None) -> Tensor:
        logsnr_1 = self.logsnr_fn(torch.ones(z.shape[0], dtype=z.dtype, device=z.device))
        x_hat = nets["student"](z, logsnr_1, y)
        return weighted_mse(x_hat.float(), x.float(), logsnr_1, self.weighting)

    def make_heldout(self, batch: Batch, seed: int) -> dict[str, Tensor]:
        out = {"x": batch.x.float().contiguous(), "z": batch.z.float().contiguous()}
        if batch.y is not None:
            out["y"] = batch.y.long().contiguous()
        return out

    def heldout_losses(self, nets: Nets, part: dict[str, Tensor]) -> Tensor:
        return self.pair_losses(nets, part["x"], part["z"], part.get("y"))


@register
class DenoisingStudent(Method):
    name = "denoising_student"
    title = "Denoising Student"
    about = ("A Denoising Student: one step from each noise onto the teacher's DDIM sample of it, learnt from "
             "pairs sampled once; their sampling is counted in the compute.")
    Options = DenoisingStudentOptions
    guidable = False

    def unguided_reason(self) -> str:
        return ("its pairs are sampled at no particular w; guided distillation distils a w-conditioned student by "
                "progressive or tract rounds")

    def check(self) -> None:
        d = self.distill
        if d.end_steps != 1:
            raise ConfigError("distill.end_steps", f"the Denoising Student samples in one step: end_steps must be 1, "
                              f"got {d.end_steps}")
        if self.options.pairs < d.batch_size:
            raise ConfigError("distill.denoising_student.pairs",
                              f"must be at least distill.batch_size ({d.batch_size}), got {self.options.pairs}")

    def step_counts(self) -> list[int]:
        return [1]

    def upfront(self) -> Upfront:
        return Upfront(pairs=self.options.pairs)

    def upfront_forwards(self) -> int:
        """Each pair is a start_steps-step DDIM sample of the teacher."""
        return self.options.pairs * self.distill.start_steps

    def forwards_per_example(self) -> int:
        """A pair is read, not computed: a plain training update's cost."""
        return TRAIN_FORWARDS

    def stage_objective(self, stage: Stage) -> PairRegression:
        return PairRegression(self, stage)
