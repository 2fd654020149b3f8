"""Samples from fixed noise, the distance between samplers, and image grids."""

from __future__ import annotations

import math
from pathlib import Path
import torch
from torch import Tensor

from raypd.diffusion import ddim_sample
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
def sample_ddim(model: Denoiser, z_1: Tensor, y: Tensor | None, n_steps: int, *, logsnr_fn: LogsnrFn,
                batch_size: int = 256, device: torch.device | str = "cpu") -> Tensor:
    """N-step DDIM samples (clipped, as for display and metrics), in batches, returned on the CPU."""
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, z_1.shape[0], batch_size):
        z = z_1[start:start + batch_size].to(device)
        yb = None if y is None else y[start:start + batch_size].to(device)
        out.append(ddim_sample(model.bind(yb), z, n_steps, logsnr_fn=logsnr_fn).cpu())
    model.train(was_training)
    return torch.cat(out)


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


def plot_distance_vs_steps(rows: list[dict], path: str | Path, *, metric: str) -> Path:
    """The paper's Fig. 4 shape: metric vs sampling steps, distilled students vs the teacher's DDIM."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=100)
    for sampler, style in (("teacher_ddim", "o--"), ("distilled", "s-")):
        pts = sorted((r["steps"], r[metric]) for r in rows if r["sampler"] == sampler)
        if pts:
            ax.plot(*zip(*pts), style, label=sampler.replace("_", " "))
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sampling steps")
    ax.set_ylabel(metric.replace("_", " "))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path

