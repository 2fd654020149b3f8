"""Building the configured denoiser."""

from __future__ import annotations

import torch
from torch import nn

from raypd.config import DataConfig, ModelConfig
from raypd.diffusion.params import output_channels
from raypd.models.denoiser import Denoiser
from raypd.models.unet import UNet


def build_denoiser(model: ModelConfig, data: DataConfig) -> Denoiser:
    """The configured backbone (the native UNet sized for the data, or a diffusers UNet2DModel) with its parameterization."""
    if model.backbone == "diffusers":
        from raypd.models.hf import build_diffusers_backbone  # imports diffusers, so only when asked for

        return Denoiser(build_diffusers_backbone(model, data), model.parameterization)
    backbone = UNet(
        in_channels=data.channels,
        out_channels=output_channels(model.parameterization, data.channels),
        resolution=data.resolution,
        ch=model.ch,
        ch_mult=model.ch_mult,
        num_res_blocks=model.num_res_blocks,
        attn_resolutions=model.attn_resolutions,
        dropout=model.dropout,
        num_classes=data.num_classes,
        head_channels=model.head_channels,
        resblock_updown=model.resblock_updown,
    )
    return Denoiser(backbone, model.parameterization)


def count_parameters(model: ModelConfig, data: DataConfig) -> int:
    """Parameter count of the configured model, without allocating its weights."""
    with torch.device("meta"):
        net: nn.Module = build_denoiser(model, data)
    return sum(p.numel() for p in net.parameters())
