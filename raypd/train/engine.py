"""The small engine interface train_step runs behind, and its plain-PyTorch implementation.

A DeepSpeed engine implements the same three members, so the training logic never
knows which one it drives.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch

from raypd.models import Denoiser
from raypd.train.ema import EMA
from raypd.train.lr import LrSchedule


class Engine(Protocol):
    model: Denoiser
    """The trainable denoiser (what the loss calls)."""

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self) -> tuple[float, float]:
        """Clip, update (unless the gradient is not finite), advance the LR; returns (grad_norm, lr)."""
        ...


class PlainEngine:
    """Adam + grad-norm clipping + LR schedule + optional EMA, in bare PyTorch."""

    def __init__(self, model: Denoiser, optimizer: torch.optim.Optimizer, schedule: LrSchedule,
                 base_lr: float, grad_clip: float, ema: EMA | None = None):
        self.model, self.optimizer, self.schedule = model, optimizer, schedule
        self.base_lr, self.grad_clip, self.ema = base_lr, grad_clip, ema
        self.updates = 0
        self.skipped_updates = 0
        self._set_lr()

    def _set_lr(self) -> float:
        lr = self.base_lr * self.schedule(self.updates)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> tuple[float, float]:
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip).item()
        lr = self.optimizer.param_groups[0]["lr"]
        if math.isfinite(grad_norm):
            self.optimizer.step()
            if self.ema is not None:
                self.ema.update(self.model)
        else:
            # a NaN/inf gradient would poison Adam's moments and every weight; drop this update
            self.skipped_updates += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.updates += 1
        self._set_lr()
        return grad_norm, lr


def build_plain_engine(model: Denoiser, *, lr: float, betas: tuple[float, float], grad_clip: float,
                       schedule: LrSchedule, ema_decay: float | None = None) -> PlainEngine:
    """Adam (the paper's optimizer) over the model's trainable weights."""
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr, betas=betas)
    ema = EMA(model, ema_decay) if ema_decay is not None else None
    return PlainEngine(model, optimizer, schedule, lr, grad_clip, ema)
