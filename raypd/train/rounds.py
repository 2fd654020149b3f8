"""The halving schedule: which rounds run, with what budget, and how a student is born and promoted."""

from __future__ import annotations

import copy
from dataclasses import dataclass

from raypd.config import DistillConfig
from raypd.diffusion import Parameterization
from raypd.diffusion.params import check_parameterization
from raypd.models import Denoiser


@dataclass(frozen=True)
class Round:
    index: int
    """0-based round number."""
    teacher_steps: int
    """Sampling steps of this round's teacher."""
    student_steps: int
    """Sampling steps of this round's student: teacher_steps / 2 (a TRACT phase: the phase's count)."""
    updates: int
    """Optimizer updates of this round."""
    guidance: bool = False
    """Guided distillation's first stage: the w-conditioned student learns the teacher's guided prediction at
    t ~ U(0, 1); it samples in ``student_steps`` = ``teacher_steps`` = start_steps, where the rounds begin."""


def plan_rounds(cfg: DistillConfig) -> list[Round]:
    """start_steps -> start_steps/2 -> ... -> end_steps (TRACT: start_steps -> each of ``phases``), with the late
    rounds' budget scaled; a guided distillation first trains its w-conditioned student (round 0)."""
    if cfg.method == "tract":
        counts = list(cfg.phases)
    elif cfg.method == "denoising_student":
        counts = [1]
    else:
        counts, steps = [], cfg.start_steps
        while steps > cfg.end_steps:
            steps //= 2
            counts.append(steps)
    rounds, teacher = [], cfg.start_steps
    if cfg.guided:
        rounds.append(Round(0, teacher, teacher, cfg.guidance_updates, guidance=True))
    for student in counts:
        updates = cfg.updates_per_round
        if student <= cfg.late_rounds_max_steps:
            updates = max(1, round(updates * cfg.late_rounds_factor))
        rounds.append(Round(len(rounds), teacher, student, updates))
        teacher = student
    return rounds


def make_student(teacher: Denoiser, parameterization: Parameterization | None = None, *,
                 guidance_input: bool = False) -> Denoiser:
    """A trainable copy of the teacher's (EMA) weights, with dropout 0; with ``guidance_input``, w-conditioned
    (a guided teacher's copy gains the w embedding, starting at zero, so it starts as the unguided teacher).

    A ``parameterization`` other than the teacher's re-reads the same output head (eps, x and v all
    have C channels): the student starts from the teacher's weights and its first round has to learn
    the new reading. ``both`` has 2C channels, so it cannot be switched to or from.
    """
    student = copy.deepcopy(teacher)
    if parameterization is not None and parameterization != teacher.parameterization:
        check_parameterization(parameterization)
        if "both" in (parameterization, teacher.parameterization):
            raise ValueError(f"a student cannot switch from the teacher's {teacher.parameterization!r} output to "
                             f"{parameterization!r}: 'both' has twice the output channels of the others")
        student.parameterization = parameterization
    if guidance_input:
        student.add_guidance_input()
    student.set_dropout(0.0)
    return student.train().requires_grad_(True)


def freeze(model: Denoiser) -> Denoiser:
    """Eval mode, no gradients: how a teacher is used."""
    return model.eval().requires_grad_(False)


TRAIN_FORWARDS = 3
"""Forward-equivalents per example of a training update: a forward, and a backward costing about two."""
DISTILL_FORWARDS = 5
"""Forward-equivalents per example of a distillation update: two teacher forwards, the student's forward and
backward (the paper's "about 5/3 of a plain training update"). TRACT's are the same: a teacher forward and a
self-teacher forward."""


def forwards_per_example(cfg: DistillConfig) -> int:
    """What one distillation example costs: a Denoising Student's pair is read, not computed, so a plain
    training update's 3; the other methods' targets cost two more forwards."""
    return TRAIN_FORWARDS if cfg.method == "denoising_student" else DISTILL_FORWARDS


def upfront_forwards(cfg: DistillConfig) -> int:
    """Forward-equivalents spent before the first update: the Denoising Student's pairs, each a start_steps-step
    DDIM sample of the teacher."""
    return cfg.pairs * cfg.start_steps if cfg.method == "denoising_student" else 0

