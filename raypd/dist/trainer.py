"""One stage (teacher training or one round) as one Ray Train ``TorchTrainer`` run.

Each stage has its own run name, so rerunning the pipeline resumes an interrupted stage from its
last checkpoint and never mixes two stages' checkpoints (Ray resumes any run by its name).
"""

from __future__ import annotations

import hashlib
import shutil
import sys
import tempfile
from pathlib import Path

from raypd.config import Config


class ClusterError(RuntimeError):
    """The cluster cannot run what the config asks for; raised before any training."""


class NumericalError(RuntimeError):
    """A stage whose loss or gradients stayed non-finite through every roll-back."""


def ensure_ray(cfg: Config) -> None:
    """Connect to the running cluster (``ray job submit`` sets RAY_ADDRESS) or start a local one."""
    import ray

    if not ray.is_initialized():
        ray.init(log_to_driver=True, configure_logging=False)
    have = ray.cluster_resources()
    d = cfg.dist
    if d.use_gpu and have.get("GPU", 0) < d.workers:
        raise ClusterError(f"dist.workers={d.workers} with dist.use_gpu=true needs {d.workers} GPUs; "
                           f"the cluster has {int(have.get('GPU', 0))}")
    if not d.use_gpu and have.get("CPU", 0) < d.workers:
        raise ClusterError(f"dist.workers={d.workers} CPU workers need {d.workers} CPUs; "
                           f"the cluster has {int(have.get('CPU', 0))}")


def run_stage(cfg: Config, *, name: str, spec: dict, storage: Path, output: Path, callbacks: list | None = None) -> dict:
    """Fit the stage's TorchTrainer and copy its consolidated model to ``output``; returns the last metrics.

    ``callbacks``: Ray Train callbacks, e.g. ``TuneReportCallback`` when the stage is a Tune trial.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from raypd.dist.worker import train_loop

    d = cfg.dist
    # each rank stages its checkpoint files on its own node's disk before Ray persists them; the
    # folder is named after the run, so a restarted worker clears what a killed one left behind
    key = hashlib.sha1(f"{storage.resolve()}/{name}".encode()).hexdigest()[:12]
    staging = Path(tempfile.gettempdir()) / "raypd-staging" / f"{name}-{key}"
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={**spec, "config": cfg.to_dict(), "staging": str(staging)},
        scaling_config=ScalingConfig(num_workers=d.workers, use_gpu=d.use_gpu),
        torch_config=TorchConfig(backend="nccl" if d.use_gpu else "gloo", timeout_s=d.collective_timeout_s),
        run_config=RunConfig(name=name, storage_path=str(storage.resolve()),
                             checkpoint_config=CheckpointConfig(num_to_keep=d.keep_checkpoints),
                             failure_config=FailureConfig(max_failures=d.max_failures), callbacks=callbacks),
    )
    print(f"[{name}] Ray Train run on {d.workers} worker(s), ZeRO stage {d.zero_stage}, {d.precision}",
          file=sys.stderr, flush=True)
    result = trainer.fit()
    shutil.rmtree(staging, ignore_errors=True)
    failure = (result.return_value or {}).get("error") if isinstance(result.return_value, dict) else None
    if failure:
        raise NumericalError(failure)
    if result.checkpoint is None:
        raise RuntimeError(f"Ray Train run {name} finished without a checkpoint")
    with result.checkpoint.as_directory() as path:
        source = Path(path) / "consolidated"
        if not (source / "meta.json").is_file():
            raise RuntimeError(f"the last checkpoint of run {name} holds no consolidated model")
        copy_into_place(source, output)
    return dict(result.metrics or {})


def copy_into_place(source: Path, output: Path) -> None:
    """Copy a checkpoint directory to ``output`` through a temporary name, so it is whole or absent."""
    tmp = output.with_name(f".{output.name}.incoming")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    shutil.rmtree(output, ignore_errors=True)
    tmp.rename(output)
