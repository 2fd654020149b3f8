"""A fixed held-out set for comparing students: the same (x, noise, t) for every trial of a round.

Training losses are measured on different random batches, noise and times in every trial, so they
do not compare fairly; the held-out loss is the distillation loss on one frozen draw of all three.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from raypd.diffusion import student_times
from raypd.diffusion.ddim import LogsnrFn
from raypd.diffusion.loss import Weighting
from raypd.models import Denoiser
from raypd.train.step import Guidance, loss_at, pair_loss_at


def make_heldout(x: Tensor, y: Tensor | None, n_steps: int, *, seed: int, z: Tensor | None = None,
                 guidance: Guidance | None = None) -> dict[str, Tensor]:
    """Noise and times on the ``n_steps`` grid (the student's; a TRACT phase's teacher's) for the images ``x``
    (and labels ``y``), drawn once from ``seed``; for pairs, their own noise ``z``. A guided distillation's set
    has a guidance weight per example, and its first stage's times are t ~ U(0, 1)."""
    if z is not None:
        out = {"x": x.float().contiguous(), "z": z.float().contiguous()}
    else:
        g = torch.Generator().manual_seed(seed)
        out = {"x": x.float().contiguous(), "eps": torch.randn(x.shape, generator=g)}
        b = x.shape[0]
        out["t"] = (torch.rand(b, generator=g) if guidance is not None and guidance.first_stage
                    else student_times(b, n_steps, generator=g))
        if guidance is not None:
            out["w"] = guidance.draw(b, g, "cpu")
    if y is not None:
        out["y"] = y.long().contiguous()
    return out


def save_heldout(heldout: dict[str, Tensor], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(heldout, str(path))
    return path


def load_heldout(path: str | Path, device: torch.device | str = "cpu") -> dict[str, Tensor]:
    return load_file(str(path), device=str(device))


@torch.no_grad()
def heldout_loss(student: Denoiser, teacher: Denoiser, heldout: dict[str, Tensor], *, n_steps: int,
                 weighting: Weighting, logsnr_fn: LogsnrFn, batch_size: int = 256,
                 self_teacher: Denoiser | None = None, teacher_steps: int | None = None,
                 guided_target: bool = False) -> float:
    """The student's mean weighted distillation loss on the held-out set (student in eval mode); under TRACT
    against the targets of its current self-teacher; with guidance weights in the set, at them (``guided_target``:
    a guided distillation's first stage, whose target is the teacher's guided x_hat)."""
    was_training = student.training
    student.eval()
    total, count = 0.0, 0
    x_all, y_all = heldout["x"], heldout.get("y")
    for start in range(0, x_all.shape[0], batch_size):
        sl = slice(start, start + batch_size)
        y = None if y_all is None else y_all[sl]
        if "z" in heldout:  # the Denoising Student's pairs
            losses = pair_loss_at(student, x_all[sl], heldout["z"][sl], y, weighting=weighting, logsnr_fn=logsnr_fn)
        else:
            losses = loss_at(student, x_all[sl], heldout["eps"][sl], heldout["t"][sl], y, weighting=weighting,
                             logsnr_fn=logsnr_fn, teacher=teacher, n_steps=n_steps, self_teacher=self_teacher,
                             teacher_steps=teacher_steps, w=heldout["w"][sl] if "w" in heldout else None,
                             guided_target=guided_target)
        total += losses.sum().item()
        count += losses.shape[0]
    student.train(was_training)
    return total / count
