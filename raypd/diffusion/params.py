"""Network output parameterizations: every one is turned into x_hat, and eps_hat follows from x_hat."""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor

from .schedule import alpha_sigma, per_example, same_shape

Parameterization = Literal["eps", "x", "v", "both"]
PARAMETERIZATIONS: tuple[str, ...] = get_args(Parameterization)


def output_channels(parameterization: Parameterization, channels: int) -> int:
    """How many channels a backbone must output for this parameterization."""
    check_parameterization(parameterization)
    return 2 * channels if parameterization == "both" else channels


def check_parameterization(parameterization: str) -> None:
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(
            f"unknown parameterization {parameterization!r}; expected one of {', '.join(PARAMETERIZATIONS)}"
        )


def x_from_output(output: Tensor, z: Tensor, logsnr: Tensor, parameterization: Parameterization) -> Tensor:
    """x_hat from a raw network output.

    ``both`` is the paper's combined (x, eps) output: 2C channels, x first, mixed as
    x_hat = sigma^2 x_out + alpha (z - sigma eps_out), which leans on the x head at high noise
    and on the eps head at low noise.
    """
    check_parameterization(parameterization)
    alpha, sigma = alpha_sigma(per_example(logsnr, z))
    if parameterization == "both":
        if output.shape[1] != 2 * z.shape[1] or output.shape[2:] != z.shape[2:] or output.shape[0] != z.shape[0]:
            raise ValueError(
                f"'both' needs an output with 2C = {2 * z.shape[1]} channels for z of shape "
                f"{tuple(z.shape)}, got output of shape {tuple(output.shape)}"
            )
        x_out, eps_out = output.chunk(2, dim=1)
        return sigma**2 * x_out + alpha * (z - sigma * eps_out)
    same_shape("output", output, "z", z)
    if parameterization == "eps":
        return (z - sigma * output) / alpha
    if parameterization == "x":
        return output
    return alpha * z - sigma * output  # v = alpha eps - sigma x


def eps_from_x(x_hat: Tensor, z: Tensor, logsnr: Tensor) -> Tensor:
    """eps_hat = (z - alpha x_hat) / sigma."""
    same_shape("x_hat", x_hat, "z", z)
    alpha, sigma = alpha_sigma(per_example(logsnr, z))
    return (z - alpha * x_hat) / sigma


def output_target(x: Tensor, eps: Tensor, logsnr: Tensor, parameterization: Parameterization) -> Tensor:
    """The network output that reproduces a given (x, eps) exactly; the inverse of x_from_output.

    For ``both`` the two heads are given their own true values (x and eps).
    """
    check_parameterization(parameterization)
    same_shape("x", x, "eps", eps)
    alpha, sigma = alpha_sigma(per_example(logsnr, x))
    if parameterization == "eps":
        return eps
    if parameterization == "x":
        return x
    if parameterization == "v":
        return alpha * eps - sigma * x
    return torch.cat([x, eps], dim=1)
