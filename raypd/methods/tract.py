"""TRACT (Berthelot et al. 2023): transitive-closure phases. Each phase distils its teacher's T steps into the
next count of ``distill.tract.phases``; within a segment of T/S teacher steps the teacher takes the first step and
a self-teacher (a bias-corrected EMA of the student, never trained, kept in every checkpoint) the rest, and the
student learns to jump to the segment's end in one step."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from raypd.config import ConfigError
from raypd.diffusion import tract_target
from raypd.methods.base import Method, register
from raypd.methods.regression import Regression, bound
from raypd.train.objective import Average, Nets
from raypd.train.stage import Stage

SELF_TEACHER = "self_teacher"


@dataclass(frozen=True)
class TractOptions:
    phases: tuple[int, ...] = ()
    """The student step count of each phase, from start_steps down to end_steps, each dividing the one before
    (e.g. [8, 1] from 32 steps: 32 -> 8 -> 1, two phases instead of five halving rounds)."""
    self_teacher_ema: float = 0.5
    """Decay of the self-teacher, a bias-corrected EMA of the student's weights (0: the student as it is now). It
    is never trained, and it is saved with every checkpoint."""

    def validate(self) -> None:
        if not 0.0 <= self.self_teacher_ema < 1.0:
            raise ConfigError("self_teacher_ema", f"must lie in [0, 1), got {self.self_teacher_ema}")


class Phase(Regression):
    """t on the teacher's T-step grid; the target is the inverted jump to the end of t's segment."""

    def averages(self) -> dict[str, Average]:
        return {SELF_TEACHER: Average("student", self.method.options.self_teacher_ema, bias_corrected=True)}

    def grid(self) -> int:
        return self.stage.steps_of_teacher

    def target(self, nets: Nets, z_t: Tensor, t: Tensor, y: Tensor | None, w: Tensor | None) -> Tensor:
        return tract_target(bound(nets["teacher"], y, w), bound(nets[SELF_TEACHER], y, w), z_t, t,
                            self.stage.steps_of_teacher, self.stage.student_steps, logsnr_fn=self.logsnr_fn)


@register
class Tract(Method):
    name = "tract"
    title = "TRACT"
    about = ("Distilled with TRACT: each phase's student jumps to the end of a segment of its teacher's steps, its "
             "targets completed by a self-teacher (a bias-corrected EMA of the student).")
    Options = TractOptions

    def check(self) -> None:
        d, phases = self.distill, self.options.phases
        if not phases:
            raise ConfigError("distill.tract.phases", "distill.method=tract needs its phases' student step counts, "
                              f"e.g. [{max(1, d.start_steps // 4)}, {d.end_steps}]")
        before = d.start_steps
        for i, steps in enumerate(phases):
            if not (1 <= steps < before and before % steps == 0):
                raise ConfigError(f"distill.tract.phases[{i}]",
                                  f"must be below and divide the step count before it ({before}), got {steps}")
            before = steps
        if phases[-1] != d.end_steps:
            raise ConfigError("distill.tract.phases", f"the last phase must end at end_steps ({d.end_steps}), got "
                              f"{list(phases)}")

    def step_counts(self) -> list[int]:
        return list(self.options.phases)

    def stage_objective(self, stage: Stage) -> Phase:
        return Phase(self, stage)
