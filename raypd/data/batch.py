"""What every data source yields and every training step consumes."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class Batch:
    x: Tensor
    """Images in [-1, 1], [B, C, H, W]."""
    y: Tensor | None = None
    """Class labels [B], for class-conditional models."""
    z: Tensor | None = None
    """The noise each image was sampled from, [B, C, H, W] (a Denoising Student's pairs: x is the teacher's sample)."""

    def to(self, device) -> "Batch":
        return Batch(self.x.to(device, non_blocking=True),
                     None if self.y is None else self.y.to(device, non_blocking=True),
                     None if self.z is None else self.z.to(device, non_blocking=True))
