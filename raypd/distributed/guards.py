"""Failures that every rank agrees on, and the settings a stage's checkpoints depend on.

An error that a restart would meet again (unreadable data, a missing file, a checkpoint written with
other settings) must stop a stage once, with one message, rather than make Ray restart the worker
group ``max_failures`` times; and a rank must never return early while the others wait for it in a
collective. So the ranks agree: one all-reduced flag, then the failing rank's message for all.
"""

from __future__ import annotations

import torch
import torch.distributed as torch_dist

from raypd.checkpoint import CheckpointError
from raypd.config import Config, ConfigError
from raypd.data.shards import DataError

SETTINGS = "raypd_dist.json"
# errors a retry would meet again: they stop the stage at once instead of restarting the worker group
DETERMINISTIC = (DataError, ConfigError, CheckpointError, FileNotFoundError, NotADirectoryError, PermissionError,
                 ValueError, TypeError, KeyError)



class StageFailure(Exception):
    """A failure every rank agreed on: ``category`` (numerical, data, checkpoint, config, settings) and message."""

    def __init__(self, category: str, message: str):
        super().__init__(message)
        self.category, self.message = category, message


def dist_settings(cfg: Config, world: int) -> dict:
    """The settings a ZeRO checkpoint's layout depends on; another value cannot load it."""
    d = cfg.dist
    return {"workers": world, "zero_stage": d.zero_stage, "precision": d.precision,
            "offload_optimizer": d.offload_optimizer, "offload_params": d.offload_params}


def settings_mismatch(saved: dict, now: dict) -> str | None:
    """A message naming every dist setting that differs from the checkpoint's, or None."""
    diff = [f"dist.{k}={saved.get(k)!r} (now {v!r})" for k, v in now.items() if saved.get(k) != v]
    if not diff:
        return None
    return ("its checkpoint was written with " + ", ".join(diff) + "; a ZeRO checkpoint only loads with the "
            "settings that wrote it: rerun with those, or remove the stage's folder under ray/ to redo the stage")


def _category(err: BaseException) -> str:
    return ("data" if isinstance(err, (DataError, FileNotFoundError, NotADirectoryError)) else
            "checkpoint" if isinstance(err, CheckpointError) else "config")


def agree(error: BaseException | None, *, world: int, label: str, device: torch.device | str = "cpu") -> None:
    """Collective: raise the same StageFailure on every rank when any rank met a deterministic error.

    One float all-reduced per call (on ``device``: NCCL reduces only GPU tensors); the messages are
    gathered only when something failed."""
    failed = torch.tensor([0.0 if error is None else 1.0], device=device)
    if world > 1:
        torch_dist.all_reduce(failed, op=torch_dist.ReduceOp.MAX)
    if not failed.item():
        return
    mine = None if error is None else (
        (error.category, error.message) if isinstance(error, StageFailure)
        else (_category(error), f"{label}: {type(error).__name__}: {error}"))
    every = [mine]
    if world > 1:
        every = [None] * world
        torch_dist.all_gather_object(every, mine)
    category, message = next(m for m in every if m is not None)
    raise StageFailure(category, message)
