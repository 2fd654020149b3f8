"""Building the configured denoiser."""

from __future__ import annotations

import torch
from torch import nn

from raypd.config import DataConfig, ModelConfig
from raypd.models.denoiser import Denoiser


def build_denoiser(model: ModelConfig, data: DataConfig, *, guidance_input: bool = False) -> Denoiser:
    """The configured network with its parameterization: raypd's UNet2DModel sized by the model settings, or
    the UNet2DModel of an imported diffusers teacher (``backbone: diffusers``); ``guidance_input``: a
    w-conditioned network (a guided distillation's student)."""
    if model.backbone == "diffusers":
        from raypd.models.imported import build_diffusers_backbone

        backbone = build_diffusers_backbone(model, data, guidance_input=guidance_input)
    else:
        from raypd.models.unet import build_unet

        backbone = build_unet(model, data, guidance_input=guidance_input)
    return Denoiser(backbone, model.parameterization, null_class=null_class(model, data))


def null_class(model: ModelConfig, data: DataConfig) -> int | None:
    """The "no class" label of a network trained with label dropout: the label after the last class."""
    return data.num_classes if data.num_classes and model.class_dropout > 0 else None


def count_parameters(model: ModelConfig, data: DataConfig) -> int:
    """Parameter count of the configured model, without allocating its weights."""
    with torch.device("meta"):
        net: nn.Module = build_denoiser(model, data)
    return sum(p.numel() for p in net.parameters())
