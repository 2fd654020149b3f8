"""Running a stage in this process: the loop the cluster's workers run, on the plain-PyTorch engine.

Checkpoints go to ``<run>/local/<stage name>/`` every ``dist.checkpoint_every`` updates, so an
interrupted stage resumes where its last checkpoint left it and a streak of non-finite updates rolls
back, exactly as on a cluster.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch

from raypd.checkpoint import publish_checkpoint, read_meta
from raypd.config import Config
from raypd.train.failures import StageFailure, driver_error
from raypd.train.engine import plain_engine
from raypd.train.objective import Objective
from raypd.train.stage import Stage
from raypd.train.stage_loop import StageLoop
from raypd.train.store import DirectoryStore


class InProcessRunner:
    """One rank, no Ray: each stage through ``StageLoop`` with ``PlainEngine``."""

    mode = "in-process"

    def __init__(self, cfg: Config, root: Path, device: torch.device, *, objectives: Callable[[Stage], Objective],
                 on_commit=None):
        """``objectives``: what trains each stage (``raypd.methods.objective_for`` bound to the run's config);
        ``on_commit``: called after each checkpoint is in place (the run's storage pushes it)."""
        self.cfg, self.root, self.device, self.on_commit = cfg, Path(root), device, on_commit
        self.objectives = objectives

    def run(self, stage: Stage, output: Path) -> dict:
        """Train ``stage`` (resuming its last checkpoint), publish its model at ``output``; returns its metrics."""
        began = time.perf_counter()
        store = DirectoryStore(self.root / stage.name, keep=self.cfg.dist.keep_checkpoints, on_commit=self.on_commit)
        try:
            loop = StageLoop(self.cfg, stage, objective=self.objectives(stage), build_engine=plain_engine,
                             store=store, staging=store.staging, device=self.device)
            loop.run(loop.resume())
        except StageFailure as failure:
            raise driver_error(failure.category, failure.message) from None
        publish_checkpoint(store.final() / "consolidated", output, {"wall_seconds": time.perf_counter() - began})
        return dict(read_meta(output).metrics)
