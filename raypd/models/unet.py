"""The denoising network: diffusers' ``UNet2DModel`` in the paper's configuration, driven by logsnr.

The paper's network (google-research ``diffusion_distillation/unet.py``, the ADM / "Improved DDPM"
UNet) is a stock ``UNet2DModel``:

* ResNet blocks whose second GroupNorm is scaled and shifted by the conditioning embedding
  (``resnet_time_scale_shift="scale_shift"``), with a zero-initialised last conv;
* self-attention at ``attn_resolutions`` (``AttnDownBlock2D``/``AttnUpBlock2D``) and in the middle
  block (``attn_norm_num_groups`` keeps that block's GroupNorm, which diffusers otherwise drops under
  scale_shift), ``head_channels`` channels per head, a zero-initialised output projection;
* BigGAN-style resampling inside residual blocks (``downsample_type``/``upsample_type`` "resnet",
  ``ResnetDownsampleBlock2D``/``ResnetUpsampleBlock2D``), or strided / nearest+conv resampling;
* ``num_res_blocks`` blocks per level down, one more up, each up block eating one skip activation;
* a zero-initialised output conv, so a fresh network predicts exactly 0.

It is conditioned on the log signal-to-noise ratio, never on an integer step, so a student may be
sampled on any time grid: logsnr goes through the paper's "inv_cos" map to a time in [0, 1], times
1000, into diffusers' sinusoidal embedding as a float timestep (``flip_sin_to_cos=False``,
``freq_shift=1``: sin first, frequencies 10000^(-i/(d/2-1)), as the paper's code).

diffusers is imported when a network is built, not when raypd is: config checks stay fast.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from raypd.config import DataConfig, ModelConfig
from raypd.config.schema import UNET_GROUPS, check_unet_shape, level_resolutions, unet_head_size
from raypd.diffusion.params import output_channels
from raypd.models.guidance import GuidedClassEmbedding, pack_labels

TIME_SCALE = 1000.0
"""The network sees 1000 * t_in as its timestep, t_in in [0, 1] (the paper's scaling)."""


def unet_config(model: ModelConfig, data: DataConfig) -> dict[str, Any]:
    """The UNet2DModel config of these model settings (a ConfigError names a key it cannot express)."""
    check_unet_shape(model, data.resolution)
    widths = [model.ch * m for m in model.ch_mult]
    resolutions = level_resolutions(model, data.resolution)
    attended = [r in model.attn_resolutions for r in resolutions]
    plain_down, plain_up = (("ResnetDownsampleBlock2D", "ResnetUpsampleBlock2D") if model.resblock_updown
                            else ("DownBlock2D", "UpBlock2D"))
    resample = "resnet" if model.resblock_updown else "conv"
    return dict(
        sample_size=data.resolution, in_channels=data.channels,
        out_channels=output_channels(model.parameterization, data.channels),
        time_embedding_type="positional", flip_sin_to_cos=False, freq_shift=1,
        down_block_types=[("AttnDownBlock2D" if a else plain_down) for a in attended],
        up_block_types=[("AttnUpBlock2D" if a else plain_up) for a in reversed(attended)],
        block_out_channels=widths, layers_per_block=model.num_res_blocks,
        downsample_type=resample, upsample_type=resample, dropout=model.dropout,
        attention_head_dim=unet_head_size(model, data.resolution),
        norm_num_groups=UNET_GROUPS, attn_norm_num_groups=UNET_GROUPS, norm_eps=1e-5,
        resnet_time_scale_shift="scale_shift", add_attention=True,
        num_class_embeds=class_embeddings(model, data) or None,
    )


def class_embeddings(model: ModelConfig, data: DataConfig) -> int:
    """Class embeddings of the network: one per class, and one more, the "no class" label, when the teacher
    trains with label dropout (``model.class_dropout``) for classifier-free guidance."""
    if not data.num_classes:
        return 0
    return data.num_classes + (1 if model.class_dropout > 0 else 0)


def zero_output_layers(unet: nn.Module) -> None:
    """Zero the last conv of every residual block, every attention output and the output conv.

    Each block then starts as the identity and the network as the constant 0 (the paper's init).
    """
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D

    layers = [unet.conv_out]
    for module in unet.modules():
        if isinstance(module, ResnetBlock2D):
            layers.append(module.conv2)
        elif isinstance(module, Attention):
            layers.append(module.to_out[0])
    with torch.no_grad():
        for layer in layers:
            layer.weight.zero_()
            layer.bias.zero_()


def logsnr_to_time_input(logsnr: Tensor) -> Tensor:
    """The paper's "inv_cos" map: the cosine-schedule time in [0, 1] with this logsnr."""
    return torch.atan(torch.exp(-0.5 * logsnr.clamp(-20.0, 20.0))) / (math.pi / 2)


class UNetBackbone(nn.Module):
    """Backbone(z, logsnr [B], y or None, w or None) -> raw output of a UNet2DModel fed ``time_input(logsnr)``;
    ``w`` (guidance weights, [B]) only for a w-conditioned network (:meth:`add_guidance_input`)."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet
        self.num_classes = int(unet.config.get("num_class_embeds") or 0)

    @property
    def guidance_input(self) -> bool:
        return isinstance(self.unet.class_embedding, GuidedClassEmbedding)

    def add_guidance_input(self) -> None:
        """Make the network w-conditioned: its class embedding gains a zero-initialised embedding of w."""
        if not self.num_classes:
            raise ValueError("only a class-conditional network can take a guidance weight")
        if not self.guidance_input:
            self.unet.class_embedding = GuidedClassEmbedding(self.unet.class_embedding)

    def time_input(self, logsnr: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, z: Tensor, logsnr: Tensor, y: Tensor | None = None, w: Tensor | None = None) -> Tensor:
        batch = z.shape[0]
        if z.ndim != 4 or z.shape[1] != self.unet.config.in_channels:
            raise ValueError(f"z must be [B, {self.unet.config.in_channels}, H, W], got {list(z.shape)}")
        if logsnr.ndim == 0:
            logsnr = logsnr.expand(batch)
        if logsnr.shape != (batch,):
            raise ValueError(f"logsnr must have shape [{batch}], got {list(logsnr.shape)}")
        if self.num_classes:
            if y is None:
                raise ValueError("this network is class-conditional (num_classes > 0): a class label y is required")
            if y.shape != (batch,):
                raise ValueError(f"y must have shape [{batch}], got {list(y.shape)}")
        elif y is not None:
            raise ValueError("this network is unconditional (num_classes == 0) but y was given")
        if self.guidance_input:
            if w is None or w.shape != (batch,):
                raise ValueError(f"this network is w-conditioned: guidance weights w of shape [{batch}] are required, "
                                 f"got {None if w is None else list(w.shape)}")
            y = pack_labels(y, w)
        elif w is not None:
            raise ValueError("this network takes no guidance weight w (it is not w-conditioned)")
        return self.unet(z, self.time_input(logsnr), class_labels=y, return_dict=False)[0]


class LogSNRUNet(UNetBackbone):
    """raypd's network: the UNet2DModel's float timestep is 1000 * inv_cos(logsnr)."""

    def time_input(self, logsnr: Tensor) -> Tensor:
        return TIME_SCALE * logsnr_to_time_input(logsnr.float())


def build_unet(model: ModelConfig, data: DataConfig, *, guidance_input: bool = False) -> LogSNRUNet:
    """A freshly initialised network for these settings (output layers zero), w-conditioned if asked."""
    from diffusers import UNet2DModel

    unet = UNet2DModel(**unet_config(model, data))
    if unet.device.type != "meta":
        zero_output_layers(unet)
    backbone = LogSNRUNet(unet)
    if guidance_input:
        backbone.add_guidance_input()
    return backbone
