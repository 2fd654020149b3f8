"""A planned stage of distillation (``Round``), how a student is born from its teacher and how a teacher is frozen.

Which rounds a run has is its method's (``raypd.methods``)."""

from __future__ import annotations

import copy
from dataclasses import dataclass

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
    """Sampling steps of this round's student."""
    updates: int
    """Optimizer updates of this round."""
    phase: str = ""
    """A stage of its own kind within the method (e.g. guided distillation's first stage, ``guidance``), with its
    own objective and settings; empty for the method's ordinary rounds."""


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
backward (the paper's "about 5/3 of a plain training update")."""
