"""Samples from fixed noise, the distance between samplers, and image grids."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from raypd.diffusion import consistency_sample, ddim_sample, stochastic_sample
from raypd.diffusion.ddim import LogsnrFn
from raypd.eval.fid import to_uint8
from raypd.models import Denoiser
from raypd.models.denoiser import forward_dtype


NOISE_BLOCK = 256
"""The evaluation noise is drawn in blocks of this many samples, each from its own seed: any slice of it
(one chunk of a 50,000-sample evaluation on one Ray task) is drawn without drawing the rest, and the noise
does not depend on how the work is split."""


def block_seed(seed: int, block: int, stream: str = "noise") -> int:
    """A 63-bit seed per (evaluation seed, block, stream), with no collisions between blocks or streams."""
    digest = hashlib.sha256(f"{seed}:{block}:{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def noise_slice(start: int, stop: int, channels: int, resolution: int, *, seed: int, num_classes: int = 0,
                stream: str = "noise") -> tuple[Tensor, Tensor | None]:
    """Samples ``start:stop`` of the fixed evaluation noise z_1 (and class labels); another ``stream`` is other
    noise from the same seed (the Denoising Student's pairs: ``pairs``)."""
    zs, ys = [], []
    for block in range(start // NOISE_BLOCK, -(-stop // NOISE_BLOCK)):
        g = torch.Generator().manual_seed(block_seed(seed, block, stream))
        z = torch.randn(NOISE_BLOCK, channels, resolution, resolution, generator=g)
        y = torch.randint(0, num_classes, (NOISE_BLOCK,), generator=g) if num_classes > 0 else None
        lo, hi = max(start - block * NOISE_BLOCK, 0), min(stop - block * NOISE_BLOCK, NOISE_BLOCK)
        zs.append(z[lo:hi])
        ys.append(None if y is None else y[lo:hi])
    z = torch.cat(zs) if zs else torch.empty(0, channels, resolution, resolution)
    return z, (torch.cat(ys) if num_classes > 0 and ys else None)


def fixed_noise(n: int, channels: int, resolution: int, *, seed: int, num_classes: int = 0
                ) -> tuple[Tensor, Tensor | None]:
    """The same z_1 (and class labels) for every sampler and round, from one seed."""
    return noise_slice(0, n, channels, resolution, seed=seed, num_classes=num_classes)


def autocast(dtype: torch.dtype | None, device: torch.device | str):
    """Autocast of the network's forward to ``dtype`` (None: none). The Denoiser turns the network's output
    into x_hat in the dtype of z, so the parameterization arithmetic and the sampler's steps stay fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


@torch.inference_mode()
def _in_batches(model: Denoiser, z_1: Tensor, y: Tensor | None, batch_size: int, device: torch.device | str,
                sampler: Callable[[Callable, Tensor], Tensor], dtype: torch.dtype | None = None,
                w: float | None = None) -> Tensor:
    """Run ``sampler(denoise, z)`` over z_1 in batches, in eval mode, and return the samples on the CPU; ``w``:
    the classifier-free guidance weight of every step (None: unguided)."""
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, z_1.shape[0], batch_size):
        z = z_1[start:start + batch_size].to(device)
        yb = None if y is None else y[start:start + batch_size].to(device)
        with autocast(dtype, device):
            denoise = model.bind(yb) if w is None else model.bind(yb, w)
            out.append(sampler(denoise, z).float().cpu())
    model.train(was_training)
    return torch.cat(out)


def sample_ddim(model: Denoiser, z_1: Tensor, y: Tensor | None, n_steps: int, *, logsnr_fn: LogsnrFn,
                batch_size: int = NOISE_BLOCK, device: torch.device | str = "cpu",
                dtype: torch.dtype | None = None, w: float | None = None) -> Tensor:
    """N-step DDIM samples (clipped, as for display and metrics), returned on the CPU in fp32; ``dtype``: the
    network's autocast dtype (bf16 on GPUs), with the sampler's arithmetic in fp32; ``w``: guided at this weight."""
    return _in_batches(model, z_1, y, batch_size, device,
                       lambda denoise, z: ddim_sample(denoise, z, n_steps, logsnr_fn=logsnr_fn), dtype, w)


def sample_stochastic(model: Denoiser, z_1: Tensor, y: Tensor | None, n_steps: int, *, logsnr_fn: LogsnrFn,
                      seed: int, batch_size: int = NOISE_BLOCK, device: torch.device | str = "cpu",
                      dtype: torch.dtype | None = None, w: float | None = None, sampler: str = "stochastic") -> Tensor:
    """N-step samples of a sampler that draws noise at each step (``stochastic``: ancestral; ``consistency``: the
    multistep consistency sampler), with the step noise drawn from ``seed`` (so reruns agree)."""
    gen = torch.Generator(device).manual_seed(seed)
    run = noisy_sampler(sampler)
    return _in_batches(model, z_1, y, batch_size, device,
                       lambda denoise, z: run(denoise, z, n_steps, logsnr_fn=logsnr_fn, generator=gen), dtype, w)


NOISY_SAMPLERS = {"stochastic": stochastic_sample, "consistency": consistency_sample}
"""The samplers that draw fresh noise at each step, by name."""


def noisy_sampler(name: str) -> Callable | None:
    """The sampler ``name`` names if it draws fresh noise at each step, else None; ``consistency@T`` is the
    consistency sampler started at t = T."""
    kind, _, start = name.partition("@")
    run = NOISY_SAMPLERS.get(kind)
    if run is None or not start:
        return run
    return functools.partial(run, t_max=float(start))


def rmse(a: Tensor, b: Tensor) -> float:
    """Root-mean-square distance between two sample sets drawn from the same noise, in [-1, 1] units."""
    return (a.double() - b.double()).square().mean().sqrt().item()


def save_grid(images: Tensor, path: str | Path, *, title: str | None = None) -> Path:
    """A square grid PNG of images in [-1, 1]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torchvision.utils import make_grid

    n = images.shape[0]
    grid = make_grid(images.clamp(-1, 1) * 0.5 + 0.5, nrow=max(1, math.isqrt(n - 1) + 1), padding=1, pad_value=1.0)
    fig, ax = plt.subplots(figsize=(4, 4.3), dpi=100)
    ax.imshow(grid.permute(1, 2, 0).numpy(), cmap="gray" if images.shape[1] == 1 else None, interpolation="nearest")
    ax.axis("off")
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


PAIR_STREAM = "pairs"
"""The Denoising Student's pairs draw their noise from this stream of the run's seed, never the evaluation's."""


def pair_noise(cfg, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Pairs ``start:stop``'s noise (and class labels)."""
    d = cfg.data
    return noise_slice(start, stop, d.channels, d.resolution, seed=cfg.run.seed, num_classes=d.num_classes,
                       stream=PAIR_STREAM)


def sample_pairs(teacher: Denoiser, cfg, start: int, stop: int, device: torch.device) -> torch.Tensor:
    """The teacher's start_steps-step DDIM samples (uint8) of pairs ``start:stop``'s noise."""
    z, y = pair_noise(cfg, start, stop)
    x = sample_ddim(teacher, z, y, cfg.distill.start_steps, logsnr_fn=cfg.diffusion.logsnr_fn(), device=device,
                    dtype=forward_dtype(cfg.eval.precision, device))
    return to_uint8(x)
