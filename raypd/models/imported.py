"""The UNet2DModel of an imported diffusers model, driven through the discrete timesteps it was trained on.

raypd conditions networks on continuous logsnr; an imported UNet2DModel takes the integer timestep
of the discrete chain it was trained on. The adapter turns logsnr into that timestep through the
chain's own logsnr table (log(alphas_cumprod / (1 - alphas_cumprod)), monotone in the timestep),
interpolating between timesteps and clamping outside the table, so the rest of raypd drives the
network exactly as it drives its own.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from raypd.config import DataConfig, ModelConfig
from raypd.diffusion.discrete import discrete_logsnr_table, timestep_from_logsnr
from raypd.models.unet import UNetBackbone


class UnsupportedModelError(ValueError):
    """A diffusers model raypd cannot drive (latent, text-conditioned, learned variance, ...)."""


def check_unet_config(config: dict[str, Any], *, channels: int, resolution: int, num_classes: int,
                      null_class: bool = False) -> None:
    """Refuse, naming the reason, a UNet2DModel config raypd cannot drive on this data (``null_class``: the
    network was trained with label dropout, its last class embedding the "no class" label)."""
    name = config.get("_class_name", "UNet2DModel")
    if name != "UNet2DModel":
        hint = " (a text/latent-conditioned UNet)" if "Condition" in name else ""
        raise UnsupportedModelError(f"the network is a {name}{hint}; raypd drives pixel-space UNet2DModel only")
    if "cross_attention_dim" in config or "encoder_hid_dim" in config:
        raise UnsupportedModelError("the network has cross-attention conditioning, which raypd cannot feed")
    in_ch, out_ch = config.get("in_channels", 3), config.get("out_channels", 3)
    if out_ch != in_ch:
        raise UnsupportedModelError(
            f"the UNet outputs {out_ch} channels for {in_ch} input channels (a learned variance or an extra head?); "
            "raypd reads an output with as many channels as the image")
    if in_ch != channels:
        raise UnsupportedModelError(
            f"the UNet takes {in_ch} input channels but the data has {channels} (data.channels); a latent "
            "diffusion model (one that works on a VAE's latents) cannot be distilled in pixel space")
    size = config.get("sample_size")
    sizes = [size, size] if isinstance(size, int) else list(size or [])
    if sizes != [resolution, resolution]:
        raise UnsupportedModelError(f"the UNet's sample_size is {size}, but data.resolution is {resolution}")
    if config.get("time_embedding_type", "positional") != "positional":
        raise UnsupportedModelError(
            f"time_embedding_type {config['time_embedding_type']!r} is not a sinusoidal embedding of a DDPM "
            "timestep; raypd drives 'positional' timestep embeddings only")
    embed_type, classes = config.get("class_embed_type"), config.get("num_class_embeds") or 0
    if embed_type is not None:
        raise UnsupportedModelError(
            f"class_embed_type {embed_type!r} is not supported; raypd feeds integer class labels to a plain "
            "class embedding (class_embed_type None with num_class_embeds)")
    expected = num_classes + (1 if null_class and num_classes else 0)
    if classes != expected:
        extra = " plus the 'no class' label of model.class_dropout" if expected != num_classes else ""
        raise UnsupportedModelError(f"the UNet embeds {classes} classes (num_class_embeds) but data.num_classes "
                                    f"is {num_classes}{extra}")


class DiffusersUNet(UNetBackbone):
    """An imported UNet2DModel fed the (fractional) timestep that has this logsnr.

    The timestep table is a plain attribute, not a buffer: it must stay float64 when the module is
    cast to bf16, and it is rebuilt from the config rather than stored with the weights.
    """

    def __init__(self, unet, betas) -> None:
        super().__init__(unet)
        self.betas = tuple(float(b) for b in betas)
        self.table = discrete_logsnr_table(self.betas)
        self._on: dict[torch.device, Tensor] = {}

    @property
    def num_timesteps(self) -> int:
        return self.table.numel()

    def time_input(self, logsnr: Tensor) -> Tensor:
        """The network's (fractional) timestep input for each logsnr, as float32."""
        if logsnr.device not in self._on:
            self._on[logsnr.device] = self.table.to(logsnr.device)
        return timestep_from_logsnr(logsnr, self._on[logsnr.device]).float()


def build_diffusers_backbone(model: ModelConfig, data: DataConfig, *, guidance_input: bool = False) -> DiffusersUNet:
    """A freshly initialised UNet2DModel from ``model.diffusers_unet`` (weights are loaded afterwards),
    w-conditioned if asked."""
    from diffusers import UNet2DModel

    check_unet_config(model.diffusers_unet, channels=data.channels, resolution=data.resolution,
                      num_classes=data.num_classes, null_class=model.class_dropout > 0)
    kwargs = {k: v for k, v in model.diffusers_unet.items() if not k.startswith("_")}
    unet = UNet2DModel.from_config(kwargs)
    backbone = DiffusersUNet(unet, model.diffusers_betas)
    if guidance_input:
        backbone.add_guidance_input()
    return backbone
