"""One stage (teacher training or one round) as one Ray Train ``TorchTrainer`` run.

Each stage has its own run name, so rerunning the pipeline resumes an interrupted stage from its
last checkpoint and never mixes two stages' checkpoints (Ray resumes any run by its name).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
import uuid
from pathlib import Path

from raypd.checkpoint import publish_checkpoint, read_meta
from raypd.config import Config
from raypd.distributed.cluster import (START_TIMEOUT_ENV, ClusterError, NodeWatch, alive_nodes,
                                      describe_losses, ensure_ray, node_losses, placeable_workers, scaling_config,
                                      worker_bundle)
from raypd.train.failures import NumericalError, StageError, driver_error
from raypd.train.stage import Stage

__all__ = ["ClusterError", "NumericalError", "RayTrainRunner", "StageError", "ensure_ray", "placeable_workers",
           "run_stage", "scaling_config", "worker_bundle"]


def _newest_settings(storage: Path | str, name: str) -> bytes | None:
    """The ``dist`` settings file of Ray run ``name``'s newest checkpoint (None before its first)."""
    from raypd.distributed.guards import SETTINGS
    from raypd.storage import Bucket, is_uri

    if is_uri(str(storage)):
        bucket = Bucket(str(storage))
        # Ray names checkpoints after the time they were taken: the newest sorts last
        found = sorted(k for k in bucket.files(name) if k.endswith(f"/{SETTINGS}") and "/checkpoint_" in f"/{k}")
        return (bucket.read_bytes(found[-1]) or b"{}") if found else None
    run = Path(storage) / name
    found = sorted(run.glob(f"checkpoint_*/{SETTINGS}"), key=lambda p: p.stat().st_mtime) if run.is_dir() else []
    return found[-1].read_bytes() if found else None


def check_stage_settings(cfg: Config, storage: Path | str, name: str) -> None:
    """Refuse to continue a stage whose newest checkpoint was written with other ``dist`` settings."""
    from raypd.distributed.guards import dist_settings, settings_mismatch

    newest = _newest_settings(storage, name)
    if newest is None:
        return
    run = f"{storage}/{name}"
    problem = settings_mismatch(json.loads(newest), dist_settings(cfg, cfg.dist.workers))
    if problem:
        raise StageError(f"stage {name} is in progress in {run}: {problem}", "settings")


def check_stages_in_progress(cfg: Config, out: Path, ray_storage: Path | str | None = None) -> None:
    """Before anything starts: every unfinished stage's Ray run checkpointed with other ``dist`` settings is
    refused (finished stages, whose checkpoints are in the run directory, are never affected).
    ``ray_storage``: where the run's Ray Train runs are (default ``out/ray``; a bucket URI for a run in one)."""
    from raypd.storage import Bucket, is_uri

    ray_dir = ray_storage if ray_storage is not None else out / "ray"
    if is_uri(str(ray_dir)):
        names = sorted({k.split("/", 1)[0] for k in Bucket(str(ray_dir)).files() if "/" in k})
    else:
        names = sorted(p.name for p in Path(ray_dir).iterdir() if p.is_dir()) if Path(ray_dir).is_dir() else []
    for name in names:
        finished = (out / "teacher" / "meta.json").is_file() if name == "teacher" else any(
            (p / "meta.json").is_file() for p in out.glob(f"{name}-*steps"))
        if not finished:
            check_stage_settings(cfg, ray_dir, name)


def _raise_failure(value) -> None:
    """Turn a worker's agreed failure into the driver's exception."""
    if isinstance(value, dict) and value.get("error"):
        raise driver_error(value.get("category", "stage"), value["error"])


class RayTrainRunner:
    """Each stage as one Ray Train run of ``dist.workers`` DeepSpeed workers, checkpointed under ``storage``."""

    mode = "ray-train"

    def __init__(self, cfg: Config, storage: Path | str, mirror=None):
        """``storage``: where Ray Train keeps the runs (a directory every node shares, or a bucket URI);
        ``mirror``: the run's bucket mirror, whose files the workers then read from the bucket."""
        self.cfg, self.storage, self.mirror = cfg, storage, mirror

    def run(self, stage: Stage, output: Path) -> dict:
        """Train ``stage``, publish its model at ``output``; returns its metrics."""
        if self.mirror is not None:  # the workers read the teacher and the shards from the bucket
            self.mirror.sync()
            stage = stage.with_locations(self.mirror.locate)
        run_stage(self.cfg, stage, storage=self.storage, output=output)
        return dict(read_meta(output).metrics)


def run_stage(cfg: Config, stage: Stage, *, storage: Path | str, output: Path, callbacks: list | None = None,
              metrics: dict | None = None) -> dict:
    """Fit the stage's TorchTrainer and publish its consolidated model at ``output`` (with ``metrics`` added to
    its own); returns the last reported metrics.

    ``callbacks``: Ray Train callbacks, e.g. ``TuneReportCallback`` when the stage is a Tune trial.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from raypd.distributed.worker import staging_root, train_loop
    from raypd.methods import method_module

    d, name, began = cfg.dist, stage.name, time.perf_counter()
    check_stage_settings(cfg, storage, name)
    # how long a restarting worker group may wait for its workers to be placed (a replacement node to boot); Ray
    # Train hands the driver's value to the run's controller
    os.environ[START_TIMEOUT_ENV] = f"{d.node_wait_s:g}"
    # each rank stages its checkpoint files on its own node's disk before Ray persists them; the
    # folder is named after the run, so a restarted worker clears what a killed one left behind
    from raypd.storage import is_uri

    storage = str(storage) if is_uri(str(storage)) else str(Path(storage).resolve())
    key = hashlib.sha1(f"{storage}/{name}".encode()).hexdigest()[:12]
    staging = staging_root(cfg, f"{name}-{key}")  # on this node; each worker resolves the name on its own
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"stage": stage.to_dict(), "config": cfg.to_dict(), "staging": staging.name,
                           "method": method_module(cfg), "run_token": uuid.uuid4().hex},
        scaling_config=scaling_config(cfg),
        torch_config=TorchConfig(backend="nccl" if d.use_gpu else "gloo", timeout_s=d.collective_timeout_s),
        run_config=RunConfig(name=name, storage_path=storage,
                             checkpoint_config=CheckpointConfig(num_to_keep=d.keep_checkpoints),
                             failure_config=FailureConfig(max_failures=d.max_failures), callbacks=callbacks),
    )
    print(f"[{name}] Ray Train run on {d.workers} worker(s), ZeRO stage {d.zero_stage}, {d.precision}",
          file=sys.stderr, flush=True)
    nodes = alive_nodes()
    try:
        with NodeWatch(name, cfg, nodes):
            result = trainer.fit()
    except Exception as err:  # noqa: BLE001 - Ray wraps the workers' last error; say it once, plainly
        if type(err).__name__ != "TrainingFailedError":
            raise
        losses = node_losses(nodes)
        lost = f"; it lost {describe_losses(losses)}" if losses else ""
        cause = _root_cause(err)
        if cause.startswith("WorkerGroupStartupTimeoutError"):
            cause = f"its workers could not be placed within dist.node_wait_s={d.node_wait_s:g} s"
        raise StageError(f"stage {name} failed after {d.max_failures} restart(s) of its worker group: "
                         f"{cause}{lost}; rerunning the job resumes it from its last checkpoint",
                         "cluster") from err
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    losses = node_losses(nodes)
    if losses:  # the stage's own count of the nodes it lost (those that held its workers) is in its metrics
        print(f"[{name}] the cluster lost {describe_losses(losses)} while the stage ran; it finished",
              file=sys.stderr, flush=True)
    _raise_failure(result.return_value)
    if result.checkpoint is None:
        raise RuntimeError(f"Ray Train run {name} finished without a checkpoint")
    with result.checkpoint.as_directory() as path:
        source = Path(path) / "consolidated"
        if not (source / "meta.json").is_file():
            raise RuntimeError(f"the last checkpoint of run {name} holds no consolidated model")
        publish_checkpoint(source, output, {"wall_seconds": time.perf_counter() - began, **(metrics or {})})
    return dict(result.metrics or {})


def _root_cause(err: BaseException) -> str:
    """The innermost error's one-line description."""
    seen = err
    while seen.__cause__ is not None or getattr(seen, "worker_failures", None):
        failures = getattr(seen, "worker_failures", None)
        if failures:
            seen = next(iter(failures.values()))
            continue
        seen = seen.__cause__
    text = str(seen).strip().splitlines()
    return f"{type(seen).__name__}: {text[-1] if text else ''}"
