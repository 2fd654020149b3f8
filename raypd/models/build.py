"""Building the configured denoiser."""

from __future__ import annotations

import torch
from torch import nn

from raypd.config import DataConfig, ModelConfig
from raypd.models.denoiser import Denoiser


def build_denoiser(model: ModelConfig, data: DataConfig) -> Denoiser:
    """The configured network with its parameterization: raypd's UNet2DModel sized by the model settings, or
    the UNet2DModel of an imported diffusers teacher (``backbone: diffusers``)."""
    if model.backbone == "diffusers":
        from raypd.models.imported import build_diffusers_backbone

        return Denoiser(build_diffusers_backbone(model, data), model.parameterization)
    from raypd.models.unet import build_unet

    return Denoiser(build_unet(model, data), model.parameterization)


def count_parameters(model: ModelConfig, data: DataConfig) -> int:
    """Parameter count of the configured model, without allocating its weights."""
    with torch.device("meta"):
        net: nn.Module = build_denoiser(model, data)
    return sum(p.numel() for p in net.parameters())
