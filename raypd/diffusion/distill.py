"""The distillation target of Algorithm 2: two teacher DDIM steps, inverted into one student step."""

from __future__ import annotations

import torch
from torch import Tensor

from .ddim import Denoise, LogsnrFn, ddim_step
from .schedule import alpha_sigma, logsnr_schedule, per_example

_GRID_TOLERANCE = 1e-4


def student_times(batch: int, n_steps: int, *, generator: torch.Generator | None = None,
                  dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> Tensor:
    """t = (i + 1) / N with i ~ U{0, ..., N-1}: the student's grid, which includes t = 1 and never t = 0."""
    if n_steps < 1:
        raise ValueError(f"n_steps must be a positive integer, got {n_steps}")
    i = torch.randint(0, n_steps, (batch,), generator=generator, device=device)
    return (i + 1).to(dtype) / n_steps


def _grid_index(t: Tensor, n_steps: int) -> Tensor:
    """i such that t = (i + 1) / N, after checking t lies on the student grid."""
    if t.dim() != 1:
        raise ValueError(f"t must have shape [B], got {tuple(t.shape)}")
    scaled = t.double() * n_steps
    k = torch.round(scaled)
    off_grid = ((scaled - k).abs() > _GRID_TOLERANCE) | (k < 1) | (k > n_steps)
    if off_grid.any():
        bad = t[off_grid][0].item()
        raise ValueError(
            f"t = {bad} is not on the {n_steps}-step student grid {{1/{n_steps}, 2/{n_steps}, ..., 1}}"
        )
    return (k - 1).long()


def distill_target(
    teacher: Denoise, z_t: Tensor, t: Tensor, n_steps: int, *, logsnr_fn: LogsnrFn = logsnr_schedule
) -> Tensor:
    """x_tilde: the x that makes ONE student DDIM step from z_t land on the teacher's two-step z_t''.

    The teacher (unclipped) steps z_t -> z_t' -> z_t'' with t' = t - 0.5/N and t'' = t - 1/N.
    Inverting the DDIM step z_t'' = alpha_t'' x + sigma_t'' (z_t - alpha_t x) / sigma_t for x gives
    x_tilde = (z_t'' - (sigma_t''/sigma_t) z_t) / (alpha_t'' - (sigma_t''/sigma_t) alpha_t).
    At the last student step (t'' = 0) the target is the teacher's second x_hat.
    """
    if n_steps < 1:
        raise ValueError(f"n_steps must be a positive integer, got {n_steps}")
    if t.shape != z_t.shape[:1]:
        raise ValueError(f"t must have shape [B] = [{z_t.shape[0]}], got {tuple(t.shape)}")
    i = _grid_index(t, n_steps)
    t = t.to(z_t.dtype)
    t_mid = (t - 0.5 / n_steps).clamp(min=0.0)
    t_end = (t - 1.0 / n_steps).clamp(min=0.0)
    logsnr_t, logsnr_mid, logsnr_end = logsnr_fn(t), logsnr_fn(t_mid), logsnr_fn(t_end)

    x_hat_1 = teacher(z_t, logsnr_t)
    z_mid = ddim_step(z_t, x_hat_1, logsnr_t, logsnr_mid)
    x_hat_2 = teacher(z_mid, logsnr_mid)
    z_end = ddim_step(z_mid, x_hat_2, logsnr_mid, logsnr_end)

    alpha_t, sigma_t = alpha_sigma(per_example(logsnr_t, z_t))
    alpha_end, sigma_end = alpha_sigma(per_example(logsnr_end, z_t))
    ratio = sigma_end / sigma_t
    x_tilde = (z_end - ratio * z_t) / (alpha_end - ratio * alpha_t)
    last = per_example(i == 0, z_t).bool()
    return torch.where(last, x_hat_2, x_tilde)


def tract_target(
    teacher: Denoise, self_teacher: Denoise, z_t: Tensor, t: Tensor, teacher_steps: int, student_steps: int, *,
    logsnr_fn: LogsnrFn = logsnr_schedule,
) -> Tensor:
    """TRACT's x target (Berthelot et al. 2023): the x whose ONE DDIM step from z_t lands where the teacher's step
    and then the self-teacher's jump land, at the end s of t's segment.

    A phase distils a T-step teacher into a student of T/S steps; time is cut into T/S segments of S teacher steps,
    and a student step from t goes to its segment's end s. The target point: one teacher DDIM step t -> t - 1/T;
    if that is s, the point itself, else the self-teacher (an EMA of the student: a student, so one step reaches
    s) takes the DDIM step t - 1/T -> s. Inverted as in :func:`distill_target`, with t'' replaced by s; at s = 0
    the target is the landed point itself. With S = 2 and the teacher as self-teacher this is
    :func:`distill_target` at N = T/2."""
    if student_steps < 1 or teacher_steps % student_steps:
        raise ValueError(f"student_steps must divide teacher_steps: {teacher_steps} teacher steps cannot be cut "
                         f"into {student_steps} segments")
    if t.shape != z_t.shape[:1]:
        raise ValueError(f"t must have shape [B] = [{z_t.shape[0]}], got {tuple(t.shape)}")
    k = _grid_index(t, teacher_steps) + 1  # t = k / T, k in 1..T
    span = teacher_steps // student_steps
    s = ((k - 1) // span * span).to(z_t.dtype) / teacher_steps
    t = t.to(z_t.dtype)
    t_next = (k - 1).to(z_t.dtype) / teacher_steps
    logsnr_t, logsnr_next, logsnr_s = logsnr_fn(t), logsnr_fn(t_next), logsnr_fn(s)
    x_first = teacher(z_t, logsnr_t)
    z_next = ddim_step(z_t, x_first, logsnr_t, logsnr_next)
    x_second = self_teacher(z_next, logsnr_next)
    at_end = per_example(t_next <= s, z_t).bool()
    z_s = torch.where(at_end, z_next, ddim_step(z_next, x_second, logsnr_next, logsnr_s))
    alpha_t, sigma_t = alpha_sigma(per_example(logsnr_t, z_t))
    alpha_s, sigma_s = alpha_sigma(per_example(logsnr_s, z_t))
    ratio = sigma_s / sigma_t
    x_tilde = (z_s - ratio * z_t) / (alpha_s - ratio * alpha_t)
    # a DDIM step to t = 0 returns x_hat itself: there the landed x_hat is the target
    return torch.where(per_example(s == 0, z_t).bool(), torch.where(at_end, x_first, x_second), x_tilde)
