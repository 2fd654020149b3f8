"""Denoiser: a backbone plus its output parameterization; the only model API the rest of raypd calls."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor, nn

from raypd.diffusion import Parameterization, eps_from_x, x_from_output
from raypd.diffusion.params import check_parameterization


class Backbone(Protocol):
    """Any network mapping (z, logsnr [B], class labels or None) to a raw output."""

    def __call__(self, z: Tensor, logsnr: Tensor, y: Tensor | None = None) -> Tensor: ...


class Denoiser(nn.Module):
    """Wraps a backbone so that callers only ever see x_hat (unclipped) and eps_hat.

    Mixed precision stays inside: the backbone may run in bf16 under autocast, but the
    parameterization arithmetic (divisions by alpha, which is 4.5e-5 at t = 1) runs in the
    dtype of ``z``.
    """

    def __init__(self, backbone: nn.Module, parameterization: Parameterization):
        super().__init__()
        check_parameterization(parameterization)
        self.backbone = backbone
        self.parameterization: Parameterization = parameterization

    def forward(self, z: Tensor, logsnr: Tensor, y: Tensor | None = None) -> Tensor:
        """x_hat(z, logsnr), never clipped."""
        output = self.backbone(z, logsnr, y)
        return x_from_output(output.to(z.dtype), z, logsnr, self.parameterization)

    def predict(self, z: Tensor, logsnr: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(x_hat, eps_hat)."""
        x_hat = self(z, logsnr, y)
        return x_hat, eps_from_x(x_hat, z, logsnr)

    def bind(self, y: Tensor | None):
        """A ``denoise(z, logsnr) -> x_hat`` callable with the class labels fixed, for the samplers."""
        return lambda z, logsnr: self(z, logsnr, y)

    def enable_gradient_checkpointing(self) -> None:
        """Recompute the network's block activations in backward instead of keeping them (diffusers' checkpointing)."""
        self.backbone.unet.enable_gradient_checkpointing()

    def set_dropout(self, p: float) -> None:
        """Set every dropout probability (students train with dropout 0)."""
        for module in self.modules():
            if isinstance(module, nn.Dropout):
                module.p = p


def forward_dtype(choice: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a network's forward for a ``auto``/``fp32``/``bf16`` setting (None: fp32): ``auto``
    is bf16 on GPUs that have it."""
    if choice == "bf16" or (choice == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return None
