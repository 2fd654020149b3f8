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
