"""The halving schedule: which rounds run, with what budget, and how a student is born and promoted."""

from __future__ import annotations

import copy
from dataclasses import dataclass

from raypd.config import DistillConfig
from raypd.models import Denoiser


@dataclass(frozen=True)
class Round:
    index: int
    """0-based round number."""
    teacher_steps: int
    """Sampling steps of this round's teacher."""
    student_steps: int
    """Sampling steps of this round's student: teacher_steps / 2."""
    updates: int
    """Optimizer updates of this round."""


def plan_rounds(cfg: DistillConfig) -> list[Round]:
    """start_steps -> start_steps/2 -> ... -> end_steps, with the late rounds' budget scaled."""
    rounds, steps = [], cfg.start_steps
    while steps > cfg.end_steps:
        student = steps // 2
        updates = cfg.updates_per_round
        if student <= cfg.late_rounds_max_steps:
            updates = max(1, round(updates * cfg.late_rounds_factor))
        rounds.append(Round(len(rounds), steps, student, updates))
        steps = student
    return rounds


def make_student(teacher: Denoiser) -> Denoiser:
    """A trainable copy of the teacher's (EMA) weights, with dropout 0."""
    student = copy.deepcopy(teacher)
    student.set_dropout(0.0)
    return student.train().requires_grad_(True)


def freeze(model: Denoiser) -> Denoiser:
    """Eval mode, no gradients: how a teacher is used."""
    return model.eval().requires_grad_(False)
