"""Denoiser: a backbone plus its output parameterization; the only model API the rest of raypd calls."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor, nn

from raypd.diffusion import Parameterization, eps_from_x, x_from_output
from raypd.diffusion.params import check_parameterization
from raypd.models.guidance import as_weights, combine


class Backbone(Protocol):
    """Any network mapping (z, logsnr [B], class labels or None) to a raw output; a w-conditioned one takes the
    guidance weights [B] as well."""

    def __call__(self, z: Tensor, logsnr: Tensor, y: Tensor | None = None) -> Tensor: ...


class Denoiser(nn.Module):
    """Wraps a backbone so that callers only ever see x_hat (unclipped) and eps_hat.

    Mixed precision stays inside: the backbone may run in bf16 under autocast, but the
    parameterization arithmetic (divisions by alpha, which is 4.5e-5 at t = 1) runs in the
    dtype of ``z``.
    """

    def __init__(self, backbone: nn.Module, parameterization: Parameterization, *, null_class: int | None = None):
        super().__init__()
        check_parameterization(parameterization)
        self.backbone = backbone
        self.parameterization: Parameterization = parameterization
        self.null_class = null_class
        """The "no class" label of a network trained with label dropout (None: it has none, and cannot guide)."""

    @property
    def guidance_input(self) -> bool:
        """Whether the network takes the guidance weight w as an input (a guided distillation's student)."""
        return bool(getattr(self.backbone, "guidance_input", False))

    def forward(self, z: Tensor, logsnr: Tensor, y: Tensor | None = None, w: Tensor | None = None) -> Tensor:
        """x_hat(z, logsnr), never clipped; ``w`` ([B]) only for a w-conditioned network."""
        output = self.backbone(z, logsnr, y) if w is None else self.backbone(z, logsnr, y, w)
        return x_from_output(output.to(z.dtype), z, logsnr, self.parameterization)

    def guided(self, z: Tensor, logsnr: Tensor, y: Tensor, w: float | Tensor) -> Tensor:
        """The classifier-free-guided x_hat at weight w (a number, or [B]): a w-conditioned network's own output,
        else (1 + w) x_hat(z, y) - w x_hat(z, no class), both halves in one forward of twice the batch (w = 0 given
        as a number is the conditional prediction alone: one forward of the batch)."""
        if y is None:
            raise ValueError("classifier-free guidance needs class labels y")
        if self.guidance_input:
            return self(z, logsnr, y, as_weights(w, z))
        if self.null_class is None:
            raise ValueError("this network has no 'no class' label to guide with: guidance needs a teacher trained "
                             "with label dropout (model.class_dropout > 0)")
        if not isinstance(w, Tensor) and w == 0:
            return self(z, logsnr, y)
        if logsnr.ndim == 0:
            logsnr = logsnr.expand(z.shape[0])
        x_both = self(torch.cat([z, z]), torch.cat([logsnr, logsnr]), torch.cat([y, torch.full_like(y, self.null_class)]))
        x_cond, x_uncond = x_both.chunk(2)
        return combine(x_cond, x_uncond, as_weights(w, z))

    def predict(self, z: Tensor, logsnr: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(x_hat, eps_hat)."""
        x_hat = self(z, logsnr, y)
        return x_hat, eps_from_x(x_hat, z, logsnr)

    def bind(self, y: Tensor | None, w: float | Tensor | None = None):
        """A ``denoise(z, logsnr) -> x_hat`` callable with the class labels (and a guidance weight) fixed, for the
        samplers and the distillation targets."""
        if w is None:
            return lambda z, logsnr: self(z, logsnr, y)
        return lambda z, logsnr: self.guided(z, logsnr, y, w)

    def add_guidance_input(self) -> None:
        """Make the network w-conditioned, starting out as its unguided self (see ``raypd.models.guidance``)."""
        self.backbone.add_guidance_input()

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
