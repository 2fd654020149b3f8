"""Progressive distillation (Salimans & Ho 2022): halving rounds, each student learning to take in one DDIM step
what its teacher takes in two (Algorithm 2)."""

from __future__ import annotations

from torch import Tensor

from raypd.diffusion import distill_target
from raypd.methods.base import Method, register
from raypd.methods.regression import Regression, bound
from raypd.train.objective import Nets
from raypd.train.stage import Stage


class HalvingRound(Regression):
    """t on the student's N-step grid; the target is the teacher's two DDIM steps inverted to one (x_tilde)."""

    def target(self, nets: Nets, z_t: Tensor, t: Tensor, y: Tensor | None, w: Tensor | None) -> Tensor:
        return distill_target(bound(nets["teacher"], y, w), z_t, t, self.stage.student_steps,
                              logsnr_fn=self.logsnr_fn)


@register
class Progressive(Method):
    name = "progressive"
    title = "progressive distillation"

    def step_counts(self) -> list[int]:
        """start_steps / 2, / 4, ... down to end_steps."""
        counts, steps = [], self.distill.start_steps
        while steps > self.distill.end_steps:
            steps //= 2
            counts.append(steps)
        return counts

    def stage_objective(self, stage: Stage) -> HalvingRound:
        return HalvingRound(self, stage)
