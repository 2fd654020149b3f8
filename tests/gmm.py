"""A Gaussian-mixture data distribution, whose exact denoiser E[x | z_t] has a closed form.

It serves as an analytic teacher: the ideal model a real teacher approximates.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from raypd.diffusion import alpha_sigma


class GaussianMixture:
    """Equal-weight mixture of isotropic Gaussians N(mu_k, s^2 I) over images of a given shape."""

    def __init__(self, means: Tensor, std: float, shape: tuple[int, ...]):
        self.means = means.reshape(means.shape[0], -1)
        self.std = std
        self.shape = shape

    @classmethod
    def random(cls, k: int, shape: tuple[int, ...], std: float = 0.1, seed: int = 0,
               dtype: torch.dtype = torch.float64) -> "GaussianMixture":
        g = torch.Generator().manual_seed(seed)
        means = torch.rand(k, math.prod(shape), generator=g, dtype=dtype) * 1.6 - 0.8
        return cls(means, std, shape)

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        k = torch.randint(0, self.means.shape[0], (n,), generator=generator)
        noise = torch.randn(n, self.means.shape[1], generator=generator, dtype=self.means.dtype)
        return (self.means[k] + self.std * noise).reshape(n, *self.shape)

    def denoise(self, z: Tensor, logsnr: Tensor) -> Tensor:
        """E[x | z] under z = alpha x + sigma eps."""
        flat = z.reshape(z.shape[0], -1).to(self.means.dtype)
        alpha, sigma = alpha_sigma(logsnr.to(self.means.dtype))
        alpha, sigma = alpha[:, None], sigma[:, None]
        var_z = alpha**2 * self.std**2 + sigma**2  # [B, 1]
        diff = flat[:, None, :] - alpha[:, None] * self.means[None]  # [B, K, D]
        logits = -diff.square().sum(-1) / (2 * var_z)  # the log-det term is the same for every k
        post = torch.softmax(logits, dim=1)  # [B, K]
        gain = (alpha * self.std**2 / var_z)[:, None]  # [B, 1, 1]
        cond_mean = self.means[None] + gain * diff
        return (post[..., None] * cond_mean).sum(1).reshape(z.shape).to(z.dtype)
