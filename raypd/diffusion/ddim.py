"""Samplers: the deterministic DDIM sampler, the paper's stochastic (ancestral) baseline, and the multistep
consistency sampler."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .params import eps_from_x
from .schedule import alpha_sigma, diffuse, logsnr_schedule, per_example, same_shape

Denoise = Callable[[Tensor, Tensor], Tensor]
"""denoise(z, logsnr) -> x_hat, with logsnr of shape [B]."""
LogsnrFn = Callable[[Tensor], Tensor]
"""t -> logsnr; the default is :func:`logsnr_schedule` with its default bounds."""


def ddim_step(z_t: Tensor, x_hat: Tensor, logsnr_t: Tensor, logsnr_s: Tensor) -> Tensor:
    """One DDIM step t -> s: z_s = alpha_s x_hat + sigma_s eps_hat, with eps_hat from x_hat."""
    same_shape("z_t", z_t, "x_hat", x_hat)
    eps_hat = eps_from_x(x_hat, z_t, logsnr_t)
    alpha_s, sigma_s = alpha_sigma(per_example(logsnr_s, z_t, "logsnr_s"))
    return alpha_s * x_hat + sigma_s * eps_hat


def _check_steps(n_steps: int) -> None:
    if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1:
        raise ValueError(f"n_steps must be a positive integer, got {n_steps!r}")


def _grid_logsnr(i: int, n_steps: int, like: Tensor, logsnr_fn: LogsnrFn, t_max: float = 1.0) -> Tensor:
    """logsnr at t = t_max i / n_steps, as a [B] tensor."""
    t = torch.full((like.shape[0],), t_max * i / n_steps, dtype=like.dtype, device=like.device)
    return logsnr_fn(t)


def _predict(denoise: Denoise, z: Tensor, logsnr: Tensor, clip: bool) -> Tensor:
    x_hat = denoise(z, logsnr)
    return x_hat.clamp(-1.0, 1.0) if clip else x_hat


def _run_sampler(denoise: Denoise, z_1: Tensor, n_steps: int, clip: bool, logsnr_fn: LogsnrFn,
                 step: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor], t_max: float = 1.0) -> Tensor:
    """t = 1, (N-1)/N, ..., 1/N (each times ``t_max``, where z_1 is taken to lie): predict x_hat, then
    ``step(z_t, x_hat, logsnr_t, logsnr_s)``; the last step returns x_hat."""
    _check_steps(n_steps)
    z = z_1
    for i in range(n_steps, 0, -1):
        logsnr_t = _grid_logsnr(i, n_steps, z, logsnr_fn, t_max)
        x_hat = _predict(denoise, z, logsnr_t, clip)
        if i == 1:
            return x_hat
        z = step(z, x_hat, logsnr_t, _grid_logsnr(i - 1, n_steps, z, logsnr_fn, t_max))
    raise AssertionError("unreachable")


def ddim_sample(
    denoise: Denoise, z_1: Tensor, n_steps: int, clip: bool = True, *, logsnr_fn: LogsnrFn = logsnr_schedule
) -> Tensor:
    """Run the N-step DDIM sampler from z_1 at t = 1, (N-1)/N, ..., 1/N.

    The last step returns x_hat itself. ``clip`` clamps every x_hat to [-1, 1] (and so the
    eps_hat derived from it), as the paper does when sampling; it never applies in training.
    """
    return _run_sampler(denoise, z_1, n_steps, clip, logsnr_fn, ddim_step)


def ancestral_step(
    z_t: Tensor, x_hat: Tensor, logsnr_t: Tensor, logsnr_s: Tensor, noise: Tensor, interp: float
) -> Tensor:
    """Sample z_s from the posterior q(z_s | z_t, x = x_hat) with an interpolated variance.

    With r = exp(logsnr_t - logsnr_s) (= SNR(t)/SNR(s) < 1) the posterior mean is
    r (alpha_s/alpha_t) z_t + (1 - r) alpha_s x_hat; the log variance interpolates between the
    posterior's own (1 - r) sigma_s^2 (interp = 0) and (1 - r) sigma_t^2 (interp = 1).
    """
    same_shape("z_t", z_t, "x_hat", x_hat)
    lt, ls = per_example(logsnr_t, z_t, "logsnr_t"), per_example(logsnr_s, z_t, "logsnr_s")
    alpha_t, sigma_t = alpha_sigma(lt)
    alpha_s, sigma_s = alpha_sigma(ls)
    r = torch.exp(lt - ls)
    one_minus_r = -torch.expm1(lt - ls)
    mean = r * (alpha_s / alpha_t) * z_t + one_minus_r * alpha_s * x_hat
    log_var = torch.log(one_minus_r) + (1 - interp) * torch.log(sigma_s**2) + interp * torch.log(sigma_t**2)
    return mean + torch.exp(0.5 * log_var) * noise


def stochastic_sample(
    denoise: Denoise,
    z_1: Tensor,
    n_steps: int,
    clip: bool = True,
    *,
    interp: float = 0.3,
    generator: torch.Generator | None = None,
    logsnr_fn: LogsnrFn = logsnr_schedule,
) -> Tensor:
    """The paper's stochastic sampler: ancestral steps on the same time grid as DDIM.

    ``interp`` in [0, 1] sets the log-space interpolation of the step variance between its
    lower and upper bound (see :func:`ancestral_step`); the best value depends on the step count.
    """
    if not 0.0 <= interp <= 1.0:
        raise ValueError(f"interp must lie in [0, 1], got {interp}")

    def step(z: Tensor, x_hat: Tensor, logsnr_t: Tensor, logsnr_s: Tensor) -> Tensor:
        noise = torch.randn(z.shape, dtype=z.dtype, device=z.device, generator=generator)
        return ancestral_step(z, x_hat, logsnr_t, logsnr_s, noise, interp)

    return _run_sampler(denoise, z_1, n_steps, clip, logsnr_fn, step)


def consistency_sample(
    denoise: Denoise,
    z_1: Tensor,
    n_steps: int,
    clip: bool = True,
    *,
    generator: torch.Generator | None = None,
    logsnr_fn: LogsnrFn = logsnr_schedule,
    t_max: float = 1.0,
) -> Tensor:
    """The multistep consistency sampler (Song et al. 2023, Algorithm 1) on the N-step grid: x_hat from z_1, then
    at each next grid time s a fresh z_s = alpha_s x_hat + sigma_s eps_new and x_hat from it. Unlike an ancestral
    step, the next point forgets z_t: a consistency model's x_hat is already the ODE's endpoint. At one step from
    t = 1 it is the one-step DDIM sample. ``t_max`` < 1 starts below pure noise (z_1 taken as z at t_max, whose
    sigma is nearly 1), on the grid t_max i / N: a model trained only up to some noise level samples from there."""

    def step(z: Tensor, x_hat: Tensor, logsnr_t: Tensor, logsnr_s: Tensor) -> Tensor:
        noise = torch.randn(z.shape, dtype=z.dtype, device=z.device, generator=generator)
        return diffuse(x_hat, noise, logsnr_s)

    return _run_sampler(denoise, z_1, n_steps, clip, logsnr_fn, step, t_max)
