"""The cosine-in-logSNR noise schedule, the schedule factory, and the forward process."""

from __future__ import annotations

import functools
import math
from typing import Callable, Literal, Sequence, get_args

import torch
from torch import Tensor

from .discrete import DiscreteLogsnr


def logsnr_schedule(t: Tensor, logsnr_min: float = -20.0, logsnr_max: float = 20.0) -> Tensor:
    """lambda(t) = -2 log tan(a t + b): cosine schedule, clipped to [logsnr_min, logsnr_max].

    ``t = 0`` gives ``logsnr_max`` and ``t = 1`` gives ``logsnr_min`` exactly; so alpha(1) is
    about 4.5e-5 for the default bounds, not 0.
    """
    if not logsnr_min < logsnr_max:
        raise ValueError(f"logsnr_min ({logsnr_min}) must be below logsnr_max ({logsnr_max})")
    t = torch.as_tensor(t)
    if not t.is_floating_point():
        raise TypeError(f"t must be a floating-point tensor, got dtype {t.dtype}")
    if t.numel() and (t.min() < 0 or t.max() > 1):
        raise ValueError(f"t must lie in [0, 1], got values in [{t.min().item()}, {t.max().item()}]")
    b = math.atan(math.exp(-0.5 * logsnr_max))
    a = math.atan(math.exp(-0.5 * logsnr_min)) - b
    # float64 inside: tan near pi/2 loses ~1e-3 of logsnr in float32, and t is only [B] values
    return (-2.0 * torch.log(torch.tan(a * t.double() + b))).to(t.dtype)


Schedule = Literal["cosine", "discrete"]
SCHEDULES: tuple[str, ...] = get_args(Schedule)


def make_logsnr_fn(schedule: Schedule = "cosine", *, logsnr_min: float = -20.0, logsnr_max: float = 20.0,
                   betas: Sequence[float] = ()) -> Callable[[Tensor], Tensor]:
    """The t -> logsnr function of a run: the one place a schedule setting becomes a function.

    ``cosine`` is :func:`logsnr_schedule` clipped to [logsnr_min, logsnr_max]; ``discrete`` is a
    teacher's own T-step schedule given by its ``betas`` (see :mod:`raypd.diffusion.discrete`), for
    networks trained on a discrete chain, whose noise levels must be the ones they were trained on.
    """
    if schedule == "cosine":
        if len(betas):
            raise ValueError("betas belong to the discrete schedule; the cosine schedule takes none")
        if not logsnr_min < logsnr_max:
            raise ValueError(f"logsnr_min ({logsnr_min}) must be below logsnr_max ({logsnr_max})")
        return functools.partial(logsnr_schedule, logsnr_min=logsnr_min, logsnr_max=logsnr_max)
    if schedule == "discrete":
        if not len(betas):
            raise ValueError("the discrete schedule needs the betas of its timesteps")
        return DiscreteLogsnr(betas, logsnr_max=logsnr_max)
    raise ValueError(f"unknown noise schedule {schedule!r}; expected one of {', '.join(SCHEDULES)}")


def alpha_sigma(logsnr: Tensor) -> tuple[Tensor, Tensor]:
    """(alpha, sigma) of the variance-preserving process: alpha^2 = sigmoid(logsnr)."""
    return torch.sigmoid(logsnr).sqrt(), torch.sigmoid(-logsnr).sqrt()


def per_example(value: Tensor, like: Tensor, name: str = "logsnr") -> Tensor:
    """Reshape a per-example ``[B]`` tensor (or a scalar) to broadcast against ``like`` [B, ...]."""
    value = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    if value.dim() == 0:
        return value
    if value.dim() != 1 or value.shape[0] != like.shape[0]:
        raise ValueError(
            f"{name} must have shape [B] = [{like.shape[0]}] to match a batch of shape "
            f"{tuple(like.shape)}, got shape {tuple(value.shape)}"
        )
    return value.reshape(-1, *([1] * (like.dim() - 1)))


def same_shape(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    """Fail with both names and shapes when two image tensors disagree."""
    if a.shape != b.shape:
        raise ValueError(f"{name_a} has shape {tuple(a.shape)} but {name_b} has shape {tuple(b.shape)}")


def diffuse(x: Tensor, eps: Tensor, logsnr: Tensor) -> Tensor:
    """The forward process: z = alpha x + sigma eps."""
    same_shape("x", x, "eps", eps)
    alpha, sigma = alpha_sigma(per_example(logsnr, x))
    return alpha * x + sigma * eps
