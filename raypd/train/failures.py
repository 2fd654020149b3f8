"""What stops a stage at once rather than being retried, and the settings a stage's checkpoints depend on.

An error that a restart would meet again (unreadable data, a missing file, a checkpoint written with
other settings) must stop a stage once, with one message. Where several ranks run a stage they agree
on it first (``raypd.distributed.guards.agree``); a single process raises it directly.
"""

from __future__ import annotations

from raypd.checkpoint import CheckpointError
from raypd.config import Config, ConfigError
from raypd.data.shards import DataError

SETTINGS = "raypd_dist.json"
# errors a retry would meet again: they stop the stage at once instead of restarting the worker group
DETERMINISTIC = (DataError, ConfigError, CheckpointError, FileNotFoundError, NotADirectoryError, PermissionError,
                 ValueError, TypeError, KeyError)


class StageFailure(Exception):
    """A failure that stops the stage: ``category`` (numerical, data, checkpoint, config, settings) and message."""

    def __init__(self, category: str, message: str):
        super().__init__(message)
        self.category, self.message = category, message

    def __reduce__(self):  # crosses process boundaries (Ray workers and tasks)
        return type(self), (self.category, self.message)


class StageError(RuntimeError):
    """A stage stopped by an error a restart would meet again (data, configuration, checkpoint, settings)."""

    def __init__(self, message: str, category: str = "stage"):
        super().__init__(message)
        self.category = category

    def __reduce__(self):
        return type(self), (str(self), self.category)


class NumericalError(StageError):
    """A stage whose loss or gradients stayed non-finite through every roll-back."""

    def __init__(self, message: str, category: str = "training"):
        super().__init__(message, category)


def driver_error(category_: str, message: str) -> StageError:
    """The driver's exception for a stage's agreed failure."""
    return NumericalError(message) if category_ == "numerical" else StageError(message, category_)


def category(err: BaseException) -> str:
    return ("data" if isinstance(err, (DataError, FileNotFoundError, NotADirectoryError)) else
            "checkpoint" if isinstance(err, CheckpointError) else "config")


def as_failure(err: BaseException, label: str) -> StageFailure:
    """A deterministic error as the StageFailure that names its stage."""
    if isinstance(err, StageFailure):
        return err
    return StageFailure(category(err), f"{label}: {type(err).__name__}: {err}")


def raise_alone(error: BaseException | None, label: str) -> None:
    """The single-process form of agreeing on an error: raise it as the stage's failure."""
    if error is not None:
        raise as_failure(error, label) from error


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
