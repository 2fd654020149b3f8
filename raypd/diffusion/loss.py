"""Loss weightings of the x-space MSE, per example."""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor

from .schedule import same_shape

Weighting = Literal["snr", "snr_trunc", "snr+1", "constant"]
WEIGHTINGS: tuple[str, ...] = get_args(Weighting)


def loss_weight(logsnr: Tensor, kind: Weighting) -> Tensor:
    """Weight on the x-space MSE; each matches an MSE in another space.

    ``snr`` is the eps-MSE, ``snr+1`` the v-MSE, ``snr_trunc`` = max(x-MSE, eps-MSE) (the
    paper's choice), ``constant`` the x-MSE itself.
    """
    snr = torch.exp(logsnr)
    if kind == "snr":
        return snr
    if kind == "snr_trunc":
        return torch.clamp(snr, min=1.0)
    if kind == "snr+1":
        return 1.0 + snr
    if kind == "constant":
        return torch.ones_like(snr)
    raise ValueError(f"unknown loss weighting {kind!r}; expected one of {', '.join(WEIGHTINGS)}")


def weighted_mse(x_hat: Tensor, x_target: Tensor, logsnr: Tensor, kind: Weighting) -> Tensor:
    """Per-example loss [B]: weight(logsnr) times the MSE of x_hat against x_target over all pixels."""
    same_shape("x_hat", x_hat, "x_target", x_target)
    mse = (x_hat - x_target).square().flatten(1).mean(dim=1)
    if logsnr.shape != mse.shape:
        raise ValueError(f"logsnr must have shape [B] = [{mse.shape[0]}], got {tuple(logsnr.shape)}")
    return loss_weight(logsnr, kind) * mse
