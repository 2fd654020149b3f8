"""The function every Ray Train worker runs: one stage through the training loop, on DeepSpeed.

Every rank saves its own ZeRO shard to a node-local staging folder and reports it (Ray merges the
ranks' files). With ``dist.checkpoint_upload=async`` Ray uploads it while training goes on and
deletes the staged copy when done; with ``sync`` each report is awaited until committed, so a worker
killed right after it resumes from it. A stage's final report is always awaited. A restarted worker
group reloads the newest committed checkpoint and continues at the same update, learning rate and data.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from raypd.config import config_from_dict
from raypd.train.stage import Stage


class RayStore:
    """Checkpoints through Ray Train: report (uploaded in the background, or awaited until committed), and the
    newest committed one back."""

    def __init__(self, upload: str = "sync"):
        self.upload = upload
        self.pending = False
        self.last_local: str | None = None

    def report(self, metrics: dict, path: str, final: bool = False) -> None:
        import ray.train
        from ray.train.v2.api.report_config import CheckpointUploadMode

        checkpoint = ray.train.Checkpoint.from_directory(path)
        if self.upload == "async" and not final:
            # The previous checkpoint's upload overlapped the interval since; it must be committed (uploaded and
            # registered with the run) before this one starts, so that a worker lost now resumes from it. A
            # checkpoint that was reported but not yet registered is lost with the worker.
            if self.pending:
                ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
            # Ray copies the staged folder to storage in the background and then deletes it
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_upload_mode=CheckpointUploadMode.ASYNC)
            self.pending = True
            return
        ray.train.report(metrics, checkpoint=checkpoint)
        ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
        # persisted by Ray now: this rank's staged copy is no longer needed
        if self.last_local is not None:
            shutil.rmtree(self.last_local, ignore_errors=True)
        self.last_local = path

    @contextlib.contextmanager
    def latest(self) -> Iterator[str | None]:
        """The newest merged checkpoint of this run (all ranks' files), or None before the first."""
        import ray.train

        reported = ray.train.get_all_reported_checkpoints(
            consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
        checkpoint = reported[-1].checkpoint if reported else ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as directory:
            yield directory


def staging_root(cfg, name: str) -> Path:
    """This node's staging folder for the run's stage ``name``: under ``dist.staging_dir``, or the temporary folder."""
    return Path(cfg.dist.staging_dir or tempfile.gettempdir()) / "raypd-staging" / name


def clear_staging(root: Path) -> Path:
    """This rank's staging folder, emptied of what a killed run left."""
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    return root


def train_loop(payload: dict) -> dict | None:
    """Run by every worker: ``payload`` holds the config, the stage (``Stage.to_dict``), a staging folder and the
    module that registers the run's method (imported first: a method registered outside raypd is known here too).

    Returns None, or ``{"error": message, "category": ...}`` for a failure that a restart would
    meet again (every rank returns the same one).
    """
    import deepspeed
    import ray.train
    import ray.train.torch
    import torch.distributed

    from raypd.distributed.deepspeed import stage_engine
    from raypd.distributed.guards import StageFailure, agree, dist_settings
    from raypd.methods import objective_for
    from raypd.methods.stages import import_method
    from raypd.storage import fetch
    from raypd.distributed.cluster import dead_nodes
    from raypd.train.stage_loop import StageLoop, WorkerGroup

    import_method(payload.get("method", "raypd.methods"))
    cfg, stage = config_from_dict(payload["config"]), Stage.from_dict(payload["stage"])
    # a run kept in a bucket: the teacher and the shards come from there, once per node
    stage = stage.with_locations(fetch)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    deepspeed.init_distributed(dist_backend="nccl" if cfg.dist.use_gpu else "gloo")
    staging = clear_staging(staging_root(cfg, payload["staging"]) / f"rank{rank}")
    nodes: list[str | None] = [None] * world  # the group's nodes: a later restart tells which of them were lost
    torch.distributed.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    group = WorkerGroup(payload.get("run_token", ""), sorted(set(nodes)), dead_nodes)
    finished = False
    try:
        loop = StageLoop(cfg, stage, objective=objective_for(cfg, stage), build_engine=stage_engine(cfg, world),
                         store=RayStore(cfg.dist.checkpoint_upload), staging=staging, device=device, rank=rank,
                         world=world, settings=dist_settings(cfg, world), group=group,
                         agree=lambda error: agree(error, world=world, label=stage.label, device=device))
        loop.run(loop.resume())
        finished = True  # the final report was awaited: nothing staged is still being uploaded
    except StageFailure as failure:
        return {"error": failure.message, "category": failure.category}
    finally:
        # after a failure a background upload may still be reading the staged files: Ray deletes what it
        # uploads, and the next start of this stage clears the rest
        if finished or cfg.dist.checkpoint_upload == "sync":
            shutil.rmtree(staging, ignore_errors=True)
    return None
