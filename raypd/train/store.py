"""Where a stage's checkpoints go while it runs, and where it finds the newest one again.

In a cluster that is Ray Train (``raypd.distributed.worker.RayStore``: every rank reports its files,
Ray merges them into one checkpoint). In one process it is a folder in the run directory: the same
reports, the same newest-checkpoint lookup, so a stage run in-process resumes and rolls back exactly
like one run by Ray workers.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
from pathlib import Path
from typing import ContextManager, Iterator, Protocol

CHECKPOINT = re.compile(r"checkpoint_(\d{8})$")


class Store(Protocol):
    """Reporting a checkpoint (a folder of this rank's files) and reading the newest merged one back."""

    def report(self, metrics: dict, path: str, final: bool = False) -> None:
        """``final``: the stage's last checkpoint, which must be in place when the call returns."""
        ...

    def latest(self) -> ContextManager[str | None]: ...


class DirectoryStore:
    """Checkpoints of a single-process stage as ``root/checkpoint_<update>``, the newest ``keep`` kept.

    A report moves the staged folder into place with one rename (the staging folder lives under ``root``,
    on the same file system), so a crash leaves either the whole checkpoint or none.
    """

    def __init__(self, root: Path, keep: int, on_commit=None):
        self.root, self.keep, self.on_commit = Path(root), keep, on_commit
        self.staging = self.root / ".staging"
        shutil.rmtree(self.staging, ignore_errors=True)  # what a killed run left half-written
        self.staging.mkdir(parents=True, exist_ok=True)

    def checkpoints(self) -> list[Path]:
        found = [p for p in self.root.iterdir() if p.is_dir() and CHECKPOINT.match(p.name)]
        return sorted(found, key=lambda p: int(CHECKPOINT.match(p.name).group(1)))

    def report(self, metrics: dict, path: str, final: bool = False) -> None:
        source = Path(path)
        (source / "metrics.json").write_text(json.dumps(metrics))
        target = self.root / f"checkpoint_{int(metrics['update']):08d}"
        if target.exists():  # the same update again after a roll-back: the new one replaces it
            shutil.rmtree(target)
        source.rename(target)
        for old in self.checkpoints()[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        if self.on_commit is not None:
            self.on_commit()

    @contextlib.contextmanager
    def latest(self) -> Iterator[str | None]:
        found = self.checkpoints()
        yield str(found[-1]) if found else None

    def final(self) -> Path:
        """The newest checkpoint (after the stage: the one holding the consolidated model)."""
        found = self.checkpoints()
        if not found:
            raise FileNotFoundError(f"{self.root} holds no checkpoint")
        return found[-1]
