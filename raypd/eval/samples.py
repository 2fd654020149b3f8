"""Samples from fixed noise, the distance between samplers, and image grids."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from raypd.diffusion import ddim_sample, stochastic_sample
from raypd.diffusion.ddim import LogsnrFn
from raypd.models import Denoiser


def fixed_noise(n: int, channels: int, resolution: int, *, seed: int, num_classes: int = 0
                ) -> tuple[Tensor, Tensor | None]:
    """The same z_1 (and class labels) for every sampler and round, from one seed."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, channels, resolution, resolution, generator=g)
    y = torch.randint(0, num_classes, (n,), generator=g) if num_classes > 0 else None
    return z, y


@torch.inference_mode()
def _in_batches(model: Denoiser, z_1: Tensor, y: Tensor | None, batch_size: int, device: torch.device | str,
                sampler: Callable[[Callable, Tensor], Tensor]) -> Tensor:
    """Run ``sampler(denoise, z)`` over z_1 in batches, in eval mode, and return the samples on the CPU."""
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, z_1.shape[0], batch_size):
        z = z_1[start:start + batch_size].to(device)
        yb = None if y is None else y[start:start + batch_size].to(device)
        out.append(sampler(model.bind(yb), z).cpu())
    model.train(was_training)
    return torch.cat(out)


def sample_ddim(model: Denoiser, z_1: Tensor, y: Tensor | None, n_steps: int, *, logsnr_fn: LogsnrFn,
                batch_size: int = 256, device: torch.device | str = "cpu") -> Tensor:
    """N-step DDIM samples (clipped, as for display and metrics), returned on the CPU."""
    return _in_batches(model, z_1, y, batch_size, device,
                       lambda denoise, z: ddim_sample(denoise, z, n_steps, logsnr_fn=logsnr_fn))


def sample_stochastic(model: Denoiser, z_1: Tensor, y: Tensor | None, n_steps: int, *, logsnr_fn: LogsnrFn,
                      seed: int, batch_size: int = 256, device: torch.device | str = "cpu") -> Tensor:
    """N-step ancestral samples, with the step noise drawn from ``seed`` (so reruns agree)."""
    gen = torch.Generator(device).manual_seed(seed)
    return _in_batches(model, z_1, y, batch_size, device,
                       lambda denoise, z: stochastic_sample(denoise, z, n_steps, logsnr_fn=logsnr_fn, generator=gen))


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
