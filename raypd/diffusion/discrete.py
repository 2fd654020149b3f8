"""A discrete noise schedule (T timesteps with betas, as DDPM and diffusers define them) in raypd's time.

A network trained on a discrete chain (timestep k = 0 .. T-1, alphas_cumprod_k = prod_{j<=k} (1 - beta_j))
knows only T noise levels, logsnr_k = log(alphas_cumprod_k / (1 - alphas_cumprod_k)), decreasing in k.
raypd works in continuous time t in [0, 1]; the map chosen here is

    t = (k + 1) / T,   i.e.   k = t T - 1,

so t = 1 is the chain's last (noisiest) timestep and the N-step grid t = i / N lands on the integer
timesteps i T / N - 1 whenever N divides T. That is exactly diffusers' ``timestep_spacing="trailing"``
(DDIMScheduler.set_timesteps), which is what makes an exported student's scheduler reproduce raypd's
sampler step for step. Between timesteps logsnr is interpolated linearly in k (the network's timestep
input is continuous); below t = 1/T, where the chain has no level, logsnr rises linearly to
``logsnr_max`` at t = 0 (t = 0 is only ever the end of the last DDIM step, which returns x_hat itself).

alphas_cumprod is computed in float32 the way diffusers computes it, so the levels here are the
levels a diffusers scheduler built from the same betas uses, to the last bit.
"""

from __future__ import annotations

import torch
from torch import Tensor

SNAP_TOLERANCE = 1e-3
"""Timestep inputs within this distance of an integer are snapped onto it (see timestep_from_logsnr)."""


def alphas_cumprod(betas) -> Tensor:
    """prod_{j<=k} (1 - beta_j) in float32, with diffusers' own arithmetic."""
    b = torch.as_tensor(betas, dtype=torch.float32, device="cpu").flatten()  # also under a meta-device context
    if b.numel() < 2:
        raise ValueError(f"a discrete schedule needs at least 2 betas, got {b.numel()}")
    if not torch.isfinite(b).all() or (b <= 0).any() or (b >= 1).any():
        raise ValueError("every beta of a discrete schedule must lie strictly between 0 and 1")
    return torch.cumprod(1.0 - b, dim=0)


def discrete_logsnr_table(betas) -> Tensor:
    """logsnr_k = log(alphas_cumprod_k / (1 - alphas_cumprod_k)) for k = 0 .. T-1, in float64 (decreasing)."""
    ac = alphas_cumprod(betas).double()
    table = torch.log(ac) - torch.log1p(-ac)
    if not torch.isfinite(table).all():
        raise ValueError("the discrete schedule reaches alphas_cumprod 0 or 1, where logsnr is infinite")
    if not (table[1:] < table[:-1]).all():
        raise ValueError("the discrete schedule's logsnr is not strictly decreasing in the timestep")
    return table


def _check_t(t: Tensor) -> Tensor:
    t = torch.as_tensor(t)
    if not t.is_floating_point():
        raise TypeError(f"t must be a floating-point tensor, got dtype {t.dtype}")
    if t.numel() and (t.min() < 0 or t.max() > 1):
        raise ValueError(f"t must lie in [0, 1], got values in [{t.min().item()}, {t.max().item()}]")
    return t


def _interp(table: Tensor, k: Tensor) -> Tensor:
    """table at fractional positions k in [0, T-1], linearly interpolated."""
    lo = k.floor().clamp(0, table.numel() - 2).long()
    w = k - lo.to(k.dtype)
    return table[lo] + w * (table[lo + 1] - table[lo])


class DiscreteLogsnr:
    """t -> logsnr on a discrete schedule (t = (k + 1) / T); a ``LogsnrFn`` like logsnr_schedule."""

    def __init__(self, betas, logsnr_max: float = 20.0):
        self.table = discrete_logsnr_table(betas)
        self.num_timesteps = self.table.numel()
        self.logsnr_top = max(float(logsnr_max), float(self.table[0]))
        self._on: dict[torch.device, Tensor] = {}

    def _table(self, device: torch.device) -> Tensor:
        if device not in self._on:
            self._on[device] = self.table.to(device)
        return self._on[device]

    def __call__(self, t: Tensor) -> Tensor:
        t = _check_t(t)
        table = self._table(t.device)
        k = t.double() * self.num_timesteps - 1.0
        on_chain = _interp(table, k.clamp(min=0.0))
        # below the chain's first level (t < 1/T): linear up to logsnr_top at t = 0
        below = self.logsnr_top + (k + 1.0) * (table[0] - self.logsnr_top)
        return torch.where(k >= 0, on_chain, below).to(t.dtype)


def timestep_from_logsnr(logsnr: Tensor, table: Tensor, snap: float = SNAP_TOLERANCE) -> Tensor:
    """The inverse of the table: the (fractional) timestep k in [0, T-1] with that logsnr, in float64.

    logsnr outside the table's range clamps to its end timesteps. A k within ``snap`` of an integer
    is snapped onto it: logsnr arrives in float32, which moves a node's k by ~1e-4, and the integer
    timesteps are the only inputs a discrete-time network was trained on (and the exact inputs a
    diffusers scheduler feeds it).
    """
    table = table.to(logsnr.device, torch.float64)
    ascending = table.flip(0)
    lam = logsnr.double().clamp(float(ascending[0]), float(ascending[-1]))
    j = torch.searchsorted(ascending, lam).clamp(1, ascending.numel() - 1)
    lo, hi = ascending[j - 1], ascending[j]
    position = (j - 1).double() + ((lam - lo) / (hi - lo)).clamp(0.0, 1.0)
    k = (ascending.numel() - 1) - position
    nearest = k.round()
    return torch.where((k - nearest).abs() < snap, nearest, k)
