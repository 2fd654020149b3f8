"""UNet denoiser used by progressive distillation (Salimans & Ho, 2022).

Mirrors google-research ``diffusion_distillation/unet.py``, which is the
ADM / "Improved DDPM" UNet:

* ResNet blocks: GroupNorm + SiLU + 3x3 conv, then the conditioning embedding
  applied as a scale/shift of the second GroupNorm, SiLU, dropout and a
  zero-initialised 3x3 conv; 1x1 skip conv when the channel count changes.
* Multi-head self-attention at chosen resolutions and in the middle block.
* BigGAN-style resampling (a residual block with avg-pool / nearest upsample
  inside it), or strided / nearest+conv resampling when ``resblock_updown``
  is False.
* The up path has ``num_res_blocks + 1`` blocks per level, each consuming one
  concatenated skip activation from the down path.

The network is conditioned on the log signal-to-noise ratio, never on an
integer step, so that a student may be sampled on any time grid.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _group_norm(channels: int) -> nn.GroupNorm:
    groups = min(32, channels)
    if channels % groups != 0:
        raise ValueError(
            f"GroupNorm needs a channel count divisible by {groups} groups, got {channels} "
            "(choose ch and ch_mult so every stage, and every skip concatenation, has a "
            "multiple of 32 channels)"
        )
    return nn.GroupNorm(groups, channels)


def logsnr_to_time_input(logsnr: Tensor) -> Tensor:
    """The official "inv_cos" mapping: a cosine-schedule time in [0, 1]."""
    return torch.atan(torch.exp(-0.5 * logsnr.clamp(-20.0, 20.0))) / (math.pi / 2)


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding ([sin, cos]) of a [B] tensor, as in DDPM."""
    half = dim // 2
    # max(.., 1) only matters for absurdly small dims; it avoids dividing by 0.
    freqs = torch.exp(
        torch.arange(half, device=t.device, dtype=torch.float32)
        * (-math.log(10000.0) / max(half - 1, 1))
    )
    args = t.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb


class ResBlock(nn.Module):
    """Residual block; ``resample`` in {None, "up", "down"} makes it BigGAN-style."""

    def __init__(self, in_ch: int, out_ch: int, emb_ch: int, dropout: float,
                 resample: str | None = None):
        super().__init__()
        if resample not in (None, "up", "down"):
            raise ValueError(f"resample must be None, 'up' or 'down', got {resample!r}")
        self.resample = resample
        self.norm1 = _group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        # Scale and shift of norm2 (ADM's use_scale_shift_norm), as the official code does.
        self.emb_proj = nn.Linear(emb_ch, 2 * out_ch)
        self.norm2 = _group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        # Zero init makes every block start as the identity, which keeps deep nets stable.
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def _resample(self, x: Tensor) -> Tensor:
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        if self.resample == "down":
            return F.avg_pool2d(x, 2)
        return x

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = F.silu(self.norm1(x))
        # Resample after the first nonlinearity, on both branches, as in BigGAN/ADM.
        h = self._resample(h)
        x = self._resample(x)
        h = self.conv1(h)
        scale, shift = self.emb_proj(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Residual multi-head self-attention over all spatial positions."""

    def __init__(self, channels: int, head_channels: int):
        super().__init__()
        self.heads = max(1, channels // head_channels)
        if channels % self.heads != 0:
            raise ValueError(
                f"attention over {channels} channels with head_channels={head_channels} "
                f"gives {self.heads} heads, which do not divide the channels evenly"
            )
        self.norm = _group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: Tensor) -> Tensor:
        b, c, height, width = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, height * width)
        # SDPA wants [B, heads, tokens, head_dim].
        q, k, v = qkv.transpose(-1, -2).unbind(dim=1)
        h = F.scaled_dot_product_attention(q, k, v)
        h = h.transpose(-1, -2).reshape(b, c, height, width)
        return x + self.proj_out(h)


def _downsample(channels: int, emb_ch: int, dropout: float, resblock: bool) -> nn.Module:
    if resblock:
        return ResBlock(channels, channels, emb_ch, dropout, resample="down")
    return nn.Conv2d(channels, channels, 3, stride=2, padding=1)


def _upsample(channels: int, emb_ch: int, dropout: float, resblock: bool) -> nn.Module:
    if resblock:
        return ResBlock(channels, channels, emb_ch, dropout, resample="up")
    return nn.Sequential(nn.Upsample(scale_factor=2.0, mode="nearest"),
                         nn.Conv2d(channels, channels, 3, padding=1))


def _validate(resolution: int, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int,
              attn_resolutions: tuple[int, ...], num_classes: int, head_channels: int,
              dropout: float) -> None:
    if not ch_mult or any(m < 1 for m in ch_mult):
        raise ValueError(f"ch_mult must be a non-empty tuple of positive ints, got {ch_mult}")
    if ch < 1 or num_res_blocks < 1 or head_channels < 1 or num_classes < 0:
        raise ValueError("ch, num_res_blocks and head_channels must be >= 1, num_classes >= 0")
    if not 0.0 <= dropout <= 1.0:
        raise ValueError(f"dropout must be in [0, 1], got {dropout}")
    factor = 2 ** (len(ch_mult) - 1)
    if resolution < 1 or resolution % factor != 0:
        raise ValueError(
            f"resolution {resolution} is not divisible by 2**(len(ch_mult)-1)={factor}")
    reached = {resolution // 2**i for i in range(len(ch_mult))}
    unreached = sorted(set(attn_resolutions) - reached)
    if unreached:
        raise ValueError(f"attn_resolutions {unreached} are never reached; "
                         f"the UNet works at resolutions {sorted(reached, reverse=True)}")


class UNet(nn.Module):
    """ADM-style UNet mapping (z, logsnr[, y]) to the model output (e.g. eps, v, x)."""

    def __init__(self, *, in_channels: int, out_channels: int, resolution: int, ch: int,
                 ch_mult: tuple[int, ...], num_res_blocks: int, attn_resolutions: tuple[int, ...],
                 dropout: float = 0.0, num_classes: int = 0, head_channels: int = 64,
                 resblock_updown: bool = True):
        super().__init__()
        ch_mult, attn_resolutions = tuple(ch_mult), tuple(attn_resolutions)
        _validate(resolution, ch, ch_mult, num_res_blocks, attn_resolutions, num_classes,
                  head_channels, dropout)
        self.in_channels, self.out_channels, self.resolution = in_channels, out_channels, resolution
        self.ch, self.num_classes = ch, num_classes
        emb_ch = 4 * ch

        self.time_embed = nn.Sequential(nn.Linear(ch, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
        self.class_embed = nn.Embedding(num_classes, emb_ch) if num_classes > 0 else None
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)

        def stage(in_ch: int, out_ch: int, res: int) -> nn.ModuleList:
            layers = [ResBlock(in_ch, out_ch, emb_ch, dropout)]
            if res in attn_resolutions:
                layers.append(AttnBlock(out_ch, head_channels))
            return nn.ModuleList(layers)

        # Down path; skip_chs records the channels of every activation the up path will consume.
        self.down = nn.ModuleList()
        skip_chs, cur, res = [ch], ch, resolution
        for level, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                self.down.append(stage(cur, ch * mult, res))
                cur = ch * mult
                skip_chs.append(cur)
            if level != len(ch_mult) - 1:
                down = _downsample(cur, emb_ch, dropout, resblock_updown)
                self.down.append(nn.ModuleList([down]))
                res //= 2
                skip_chs.append(cur)

        self.middle = nn.ModuleList([ResBlock(cur, cur, emb_ch, dropout),
                                     AttnBlock(cur, head_channels),
                                     ResBlock(cur, cur, emb_ch, dropout)])

        self.up = nn.ModuleList()
        self._up_takes_skip: list[bool] = []  # False for the upsampling stages
        for level in reversed(range(len(ch_mult))):
            for _ in range(num_res_blocks + 1):
                self.up.append(stage(cur + skip_chs.pop(), ch * ch_mult[level], res))
                self._up_takes_skip.append(True)
                cur = ch * ch_mult[level]
            if level != 0:
                self.up.append(nn.ModuleList([_upsample(cur, emb_ch, dropout, resblock_updown)]))
                self._up_takes_skip.append(False)
                res *= 2

        self.norm_out = _group_norm(cur)
        self.conv_out = nn.Conv2d(cur, out_channels, 3, padding=1)
        # Zero output: a fresh model predicts exactly 0, a neutral starting point.
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def set_dropout(self, p: float) -> None:
        """Set the rate of every dropout layer (distillation students use 0)."""
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout must be in [0, 1], got {p}")
        for module in self.modules():
            if isinstance(module, nn.Dropout):
                module.p = p

    def _embed(self, logsnr: Tensor, y: Tensor | None, batch: int, dtype: torch.dtype) -> Tensor:
        if logsnr.ndim == 0:
            logsnr = logsnr.expand(batch)
        if logsnr.shape != (batch,):
            raise ValueError(f"logsnr must have shape [{batch}], got {list(logsnr.shape)}")
        t_in = logsnr_to_time_input(logsnr.float())
        emb = self.time_embed(timestep_embedding(1000.0 * t_in, self.ch).to(dtype))
        if self.class_embed is not None:
            if y is None:
                raise ValueError("this UNet is class-conditional (num_classes > 0): "
                                 "a class label y is required")
            if y.shape != (batch,):
                raise ValueError(f"y must have shape [{batch}], got {list(y.shape)}")
            emb = emb + self.class_embed(y)
        elif y is not None:
            raise ValueError("this UNet is unconditional (num_classes == 0) but y was given")
        return emb

    @staticmethod
    def _run(layers: nn.ModuleList, h: Tensor, emb: Tensor) -> Tensor:
        for layer in layers:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        return h

    def forward(self, z: Tensor, logsnr: Tensor, y: Tensor | None = None) -> Tensor:
        if z.ndim != 4 or z.shape[1] != self.in_channels:
            raise ValueError(f"z must be [B, {self.in_channels}, H, W], got {list(z.shape)}")
        emb = self._embed(logsnr, y, z.shape[0], z.dtype)
        hs = [self.conv_in(z)]
        for layers in self.down:
            hs.append(self._run(layers, hs[-1], emb))
        h = self._run(self.middle, hs[-1], emb)
        for layers, takes_skip in zip(self.up, self._up_takes_skip):
            if takes_skip:
                h = torch.cat([h, hs.pop()], dim=1)
            h = self._run(layers, h, emb)
        return self.conv_out(F.silu(self.norm_out(h)))
