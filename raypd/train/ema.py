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

    def __init__(self, model: nn.Module, decay: float, *, bias_corrected: bool = False):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1), got {decay}")
        self.decay, self.bias_corrected = decay, bias_corrected
        self.count = 0
        """Updates averaged so far."""
        self.shadow = copy.deepcopy(model).float().eval().requires_grad_(False)

    def rate(self) -> float:
        """The weight of the newest weights in the average at the next update.

        Bias-corrected (as Adam's moments): the average of a zero-started EMA divided by 1 - decay^k, i.e. the
        weights seen so far weighted by decay^(age), normalised. As a running average that is a lerp at rate
        (1 - decay) / (1 - decay^k), so the first update replaces the starting copy outright."""
        if not self.bias_corrected:
            return 1.0 - self.decay
        k = self.count + 1
        return (1.0 - self.decay) / (1.0 - self.decay**k)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One averaging step. Weights of another dtype (bf16) are converted a chunk at a time, so the fp32
        temporary stays under CHUNK elements instead of a second full copy of the model."""
        pairs = list(zip(self.shadow.parameters(), model.parameters()))
        rate = self.rate()
        self.count += 1
        start = 0
        while start < len(pairs):
            end, size = start, 0
            while end < len(pairs) and (end == start or size + pairs[end][0].numel() <= self.CHUNK):
                size += pairs[end][0].numel()
                end += 1
            shadow = [e for e, _ in pairs[start:end]]
            torch._foreach_lerp_(shadow, [p.detach().to(e.dtype) for e, p in pairs[start:end]], rate)
            start = end
        for eb, b in zip(self.shadow.buffers(), model.buffers()):
            eb.copy_(b)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.shadow.load_state_dict(state)
