"""Learning-rate multipliers as functions of the 0-based update index."""

from __future__ import annotations

from typing import Callable

LrSchedule = Callable[[int], float]


def warmup(warmup_updates: int) -> LrSchedule:
    """Teacher training: linear warm-up from lr/warmup_updates to lr, then constant."""
    if warmup_updates <= 0:
        return lambda update: 1.0
    return lambda update: min(1.0, (update + 1) / warmup_updates)


def warmup_then_decay(warmup_updates: int, total_updates: int) -> LrSchedule:
    """Teacher training with ``teacher.lr_decay=linear``: linear warm-up to lr, then linear decay to 0 at the last
    update."""
    rise = warmup(warmup_updates)
    span = max(1, total_updates - warmup_updates)
    return lambda update: rise(update) * min(1.0, max(0.0, (total_updates - update) / span))


def linear_decay(total_updates: int) -> LrSchedule:
    """A distillation round: linear decay from lr towards 0 over the round, no warm-up."""
    if total_updates < 1:
        raise ValueError(f"total_updates must be >= 1, got {total_updates}")
    return lambda update: max(0.0, 1.0 - update / total_updates)
