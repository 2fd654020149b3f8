"""Exponential moving average of a model's weights."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """shadow <- decay * shadow + (1 - decay) * weights, after every optimizer update.

    The shadow is a full module in eval mode, so it can be sampled from and saved directly. It is
    kept in fp32 whatever the model's dtype: in bf16 an update of (1 - 0.9999) x a small difference
    falls below the format's resolution and the average barely moves.
    Buffers (none in the UNet) are copied, not averaged.
    """

    CHUNK = 1 << 24
    """Elements converted per averaging chunk (64 MB in fp32)."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1), got {decay}")
        self.decay = decay
        self.shadow = copy.deepcopy(model).float().eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One averaging step. Weights of another dtype (bf16) are converted a chunk at a time, so the fp32
        temporary stays under CHUNK elements instead of a second full copy of the model."""
        pairs = list(zip(self.shadow.parameters(), model.parameters()))
        start = 0
        while start < len(pairs):
            end, size = start, 0
            while end < len(pairs) and (end == start or size + pairs[end][0].numel() <= self.CHUNK):
                size += pairs[end][0].numel()
                end += 1
            shadow = [e for e, _ in pairs[start:end]]
            torch._foreach_lerp_(shadow, [p.detach().to(e.dtype) for e, p in pairs[start:end]], 1.0 - self.decay)
            start = end
        for eb, b in zip(self.shadow.buffers(), model.buffers()):
            eb.copy_(b)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.shadow.load_state_dict(state)
