"""Small in-memory data sets and an endless, seeded batch stream over them."""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from raypd.config import DataConfig
from raypd.data.batch import Batch


def load_digits(cfg: DataConfig) -> tuple[Tensor, Tensor]:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 real scans), resized, in [-1, 1].

    Returns images [N, C, R, R] float32 and labels [N] int64.
    """
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    images = torch.from_numpy(np.asarray(bunch.images, dtype=np.float32) / 16.0)[:, None]  # 0..16 grey levels
    if cfg.resolution != images.shape[-1]:
        images = F.interpolate(images, size=(cfg.resolution, cfg.resolution), mode="bilinear",
                               align_corners=False, antialias=cfg.resolution < images.shape[-1])
    images = images.clamp(0, 1).repeat(1, cfg.channels, 1, 1) * 2 - 1
    return images.contiguous(), torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))


class ImageBatches:
    """Endless shuffled batches from tensors in memory, reproducible from (seed, position).

    ``position`` counts batches drawn, so a resumed run continues the same stream.
    """

    def __init__(self, images: Tensor, labels: Tensor | None, batch_size: int, *, seed: int,
                 random_flip: bool = False, position: int = 0):
        if batch_size > images.shape[0]:
            raise ValueError(f"batch_size {batch_size} exceeds the data set's {images.shape[0]} images")
        self.images, self.labels, self.batch_size = images, labels, batch_size
        self.seed, self.random_flip, self.position = seed, random_flip, position

    def _epoch_order(self, epoch: int) -> Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.images.shape[0], generator=g)

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        per_epoch = self.images.shape[0] // self.batch_size
        epoch, k = divmod(self.position, per_epoch)
        idx = self._epoch_order(epoch)[k * self.batch_size:(k + 1) * self.batch_size]
        x = self.images[idx]
        if self.random_flip:
            g = torch.Generator().manual_seed(self.seed * 7_919 + self.position)
            flip = torch.rand(x.shape[0], generator=g) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        self.position += 1
        return Batch(x=x, y=self.labels[idx] if self.labels is not None else None)
