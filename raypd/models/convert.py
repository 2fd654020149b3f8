"""Weights of raypd's former hand-written UNet, renamed into the UNet2DModel that replaced it.

Checkpoints written before raypd built its network with diffusers hold the same function under other
names: ``time_embed.0`` is ``time_embedding.linear_1``, the flat ``down``/``up`` lists are diffusers'
per-level blocks, a ResBlock's ``emb_proj``/``skip`` are ``time_emb_proj``/``conv_shortcut``, and an
attention block's 1x1 ``qkv`` conv is three linear maps stacked row-wise (q, k, v, heads in order).
:func:`convert_state` renames and reshapes; nothing is recomputed, so outputs agree to float32
rounding (the attention runs as linear layers instead of 1x1 convs).
"""

from __future__ import annotations

from typing import Mapping

from torch import Tensor

from raypd.config import DataConfig, ModelConfig
from raypd.config.schema import level_resolutions

LEGACY_MARK = "time_embed.0.weight"
"""A key only the former network has (diffusers calls it ``time_embedding.linear_1.weight``)."""


def is_legacy(state: Mapping[str, Tensor], prefix: str = "backbone.") -> bool:
    return prefix + LEGACY_MARK in state


def _resblock(old: str, new: str) -> dict[str, str]:
    names = {"norm1": "norm1", "conv1": "conv1", "emb_proj": "time_emb_proj", "norm2": "norm2", "conv2": "conv2",
             "skip": "conv_shortcut"}
    return {f"{old}.{a}.{p}": f"{new}.{b}.{p}" for a, b in names.items() for p in ("weight", "bias")}


def _attention(old: str, new: str) -> dict[str, str]:
    return {f"{old}.norm.weight": f"{new}.group_norm.weight", f"{old}.norm.bias": f"{new}.group_norm.bias",
            f"{old}.proj_out.weight": f"{new}.to_out.0.weight", f"{old}.proj_out.bias": f"{new}.to_out.0.bias"}


def _names(model: ModelConfig, data: DataConfig) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """(old name -> new name, [(old qkv prefix, new attention prefix)]) for these settings."""
    names = {"time_embed.0.weight": "time_embedding.linear_1.weight", "time_embed.0.bias": "time_embedding.linear_1.bias",
             "time_embed.2.weight": "time_embedding.linear_2.weight", "time_embed.2.bias": "time_embedding.linear_2.bias",
             "class_embed.weight": "class_embedding.weight", "conv_in.weight": "conv_in.weight",
             "conv_in.bias": "conv_in.bias", "norm_out.weight": "conv_norm_out.weight",
             "norm_out.bias": "conv_norm_out.bias", "conv_out.weight": "conv_out.weight", "conv_out.bias": "conv_out.bias"}
    qkv: list[tuple[str, str]] = []
    attended = [r in model.attn_resolutions for r in level_resolutions(model, data.resolution)]
    levels = len(model.ch_mult)

    def stage(old: str, new: str, j: int, attn: bool) -> None:
        names.update(_resblock(f"{old}.0", f"{new}.resnets.{j}"))
        if attn:
            names.update(_attention(f"{old}.1", f"{new}.attentions.{j}"))
            qkv.append((f"{old}.1.qkv", f"{new}.attentions.{j}"))

    def resample(old: str, new: str) -> None:
        if model.resblock_updown:
            names.update(_resblock(f"{old}.0", f"{new}.0"))
        else:  # a strided conv down, nn.Sequential(Upsample, Conv) up
            conv = f"{old}.0" if new.endswith("downsamplers") else f"{old}.0.1"
            names.update({f"{conv}.{p}": f"{new}.0.conv.{p}" for p in ("weight", "bias")})

    i = 0
    for level in range(levels):
        for j in range(model.num_res_blocks):
            stage(f"down.{i}", f"down_blocks.{level}", j, attended[level])
            i += 1
        if level != levels - 1:
            resample(f"down.{i}", f"down_blocks.{level}.downsamplers")
            i += 1
    names.update(_resblock("middle.0", "mid_block.resnets.0"))
    names.update(_attention("middle.1", "mid_block.attentions.0"))
    qkv.append(("middle.1.qkv", "mid_block.attentions.0"))
    names.update(_resblock("middle.2", "mid_block.resnets.1"))
    i = 0
    for k, level in enumerate(reversed(range(levels))):
        for j in range(model.num_res_blocks + 1):
            stage(f"up.{i}", f"up_blocks.{k}", j, attended[level])
            i += 1
        if level != 0:
            resample(f"up.{i}", f"up_blocks.{k}.upsamplers")
            i += 1
    return names, qkv


def convert_state(state: Mapping[str, Tensor], model: ModelConfig, data: DataConfig,
                  prefix: str = "backbone.") -> dict[str, Tensor]:
    """A former-UNet state dict (keys under ``prefix``) as the state dict of today's network.

    Keys outside ``prefix`` pass through; a key of the former network this mapping does not know
    raises KeyError naming it, so a mismatch never loads half a model.
    """
    names, qkv = _names(model, data)
    out: dict[str, Tensor] = {k: v for k, v in state.items() if not k.startswith(prefix)}
    unet = prefix + "unet."
    for old, new in qkv:
        for p in ("weight", "bias"):
            stacked = state[f"{prefix}{old}.{p}"]
            if p == "weight":
                stacked = stacked.flatten(1)  # [3C, C, 1, 1] conv -> [3C, C] linear
            for part, chunk in zip(("to_q", "to_k", "to_v"), stacked.chunk(3, dim=0)):
                out[f"{unet}{new}.{part}.{p}"] = chunk.contiguous()
    qkv_keys = {f"{prefix}{old}.{p}" for old, _ in qkv for p in ("weight", "bias")}
    for key, value in state.items():
        if not key.startswith(prefix) or key in qkv_keys:
            continue
        name = key[len(prefix):]
        if name not in names:
            raise KeyError(f"{key} is not a weight of the former UNet these model settings describe")
        new = names[name]
        if new.endswith("to_out.0.weight"):
            value = value.flatten(1)  # 1x1 conv -> linear
        out[unet + new] = value
    return out
