"""Failures that every rank of a stage agrees on.

An error that a restart would meet again (unreadable data, a missing file, a checkpoint written with
other settings) must stop a stage once, with one message, rather than make Ray restart the worker
group ``max_failures`` times; and a rank must never return early while the others wait for it in a
collective. So the ranks agree: one all-reduced flag, then the failing rank's message for all.
"""

from __future__ import annotations

import torch
import torch.distributed as torch_dist

from raypd.train.failures import (DETERMINISTIC, SETTINGS, StageFailure, as_failure, dist_settings,
                                   settings_mismatch)

__all__ = ["DETERMINISTIC", "SETTINGS", "StageFailure", "agree", "dist_settings", "settings_mismatch"]


def agree(error: BaseException | None, *, world: int, label: str, device: torch.device | str = "cpu") -> None:
    """Collective: raise the same StageFailure on every rank when any rank met a deterministic error.

    One float all-reduced per call (on ``device``: NCCL reduces only GPU tensors); the messages are
    gathered only when something failed."""
    failed = torch.tensor([0.0 if error is None else 1.0], device=device)
    if world > 1:
        torch_dist.all_reduce(failed, op=torch_dist.ReduceOp.MAX)
    if not failed.item():
        return
    failure = None if error is None else as_failure(error, label)
    mine = None if failure is None else (failure.category, failure.message)
    every = [mine]
    if world > 1:
        every = [None] * world
        torch_dist.all_gather_object(every, mine)
    category, message = next(m for m in every if m is not None)
    raise StageFailure(category, message)
