"""``--dry-run``: what a run would do and what it would cost, checked without a cluster.

Resolves the config, checks the data and the teacher checkpoint where they can be reached from
here, and prints the plan: stages, workers, batch per worker, updates, and an estimate of the
compute (model FLOPs counted on the meta device, so even the ImageNet-64 UNet costs nothing to
plan). Placeholders and unreachable object stores are warnings (the cluster may see what this
machine cannot); a missing local file or an incompatible checkpoint is an error.
"""

from __future__ import annotations

import concurrent.futures
from dataclasses import dataclass, field
from pathlib import Path

import torch

from raypd.config import Config
from raypd.train.rounds import plan_rounds

PEAK_FLOPS = 312e12
"""Dense bf16 peak of an A100 (the estimate's reference GPU)."""
UTILISATION = 0.35
"""Fraction of peak a diffusion UNet typically sustains in training (an assumption, stated in the output)."""
REMOTE_CHECK_S = 20.0


@dataclass
class Checks:
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    passed: list[str] = field(default_factory=list)


def forward_flops(cfg: Config) -> tuple[int, float]:
    """(parameters, FLOPs of one forward pass per image), counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    from raypd.models import build_denoiser

    d = cfg.data

    def count(device: str) -> tuple[int, float]:
        with torch.device(device), torch.no_grad():
            model = build_denoiser(cfg.model, d)
            z = torch.zeros(1, d.channels, d.resolution, d.resolution)
            y = torch.zeros(1, dtype=torch.long) if d.num_classes else None
            with FlopCounterMode(display=False) as counter:
                model(z, torch.zeros(1), y)
        return sum(p.numel() for p in model.parameters()), float(counter.get_total_flops())

    try:
        return count("meta")
    except (RuntimeError, NotImplementedError):  # a backbone that reads values (a timestep lookup): count for real
        return count("cpu")


def check_data(cfg: Config, checks: Checks) -> None:
    d = cfg.data
    if d.source == "digits":
        checks.passed.append("data: scikit-learn's bundled digits (written as shards on first use)")
        return
    if d.source != "shards":
        for name, value in (("data.path", d.path), ("data.labels_path", d.labels_path)):
            if value and not Path(value).exists():
                checks.errors.append(f"{name}: {value} does not exist")
        if not checks.errors:
            checks.passed.append(f"data: {d.source} at {d.path} (written as shards on first use)")
        return
    if "YOUR-" in d.shards.upper() or "<" in d.shards:
        checks.warnings.append(f"data.shards is still a placeholder ({d.shards}): set it to your shards")
        return
    from raypd.data.shards import DataError, check_shards, expand_urls

    try:
        urls = expand_urls(d.shards)
    except DataError as err:
        checks.errors.append(f"data.shards: {err}")
        return
    workers = max(1, cfg.dist.workers)
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    job = pool.submit(check_shards, urls, resolution=d.resolution, channels=d.channels, num_classes=d.num_classes,
                      world_size=workers, num_workers=d.loader_workers)
    try:
        manifest = job.result(timeout=REMOTE_CHECK_S)
        count = (manifest or {}).get("splits", {}).get("train", {}).get("count", "?")
        checks.passed.append(f"data: {len(urls)} shards, {count} training images, checked against the model")
    except DataError as err:
        checks.errors.append(f"data.shards: {err}")
    except concurrent.futures.TimeoutError:
        checks.warnings.append(f"data.shards: could not reach {urls[0]} within {REMOTE_CHECK_S:.0f} s from here")
    except Exception as err:  # noqa: BLE001 - a store this machine cannot reach is the cluster's business
        checks.warnings.append(f"data.shards: not checked from here ({type(err).__name__}: {err})")
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def planned_config(cfg: Config, checks: Checks) -> Config:
    """The config the rounds will run under: with a diffusers teacher, its network and schedule."""
    if cfg.teacher.source != "diffusers":
        return cfg
    import dataclasses

    from raypd.checkpoint import CheckpointError
    from raypd.hf.teacher import check_source

    try:
        source, chain = check_source(cfg)
    except (CheckpointError, ImportError, OSError, ValueError) as err:
        checks.errors.append(str(err) if str(err).startswith("teacher.") else f"teacher.diffusers_path: {err}")
        return cfg
    checks.passed.append(f"teacher: diffusers UNet2DModel at {cfg.teacher.diffusers_path} "
                         f"({chain.parameterization} output, {chain.num_timesteps} timesteps), imported at start")
    model = dataclasses.replace(cfg.model, backbone="diffusers", diffusers_unet=source.unet_config,
                                diffusers_betas=chain.betas, parameterization=chain.parameterization)
    return dataclasses.replace(cfg, model=model)


def check_teacher(cfg: Config, checks: Checks) -> None:
    path = cfg.teacher.checkpoint
    if cfg.teacher.source == "diffusers":
        return  # checked by planned_config
    if not path:
        checks.passed.append(f"teacher: trained first ({cfg.teacher.updates} updates)")
        return
    from raypd.checkpoint import CheckpointError, check_compatible, read_meta

    try:
        check_compatible(read_meta(path), cfg, path)
        checks.passed.append(f"teacher: {path} fits the config")
    except CheckpointError as err:
        checks.errors.append(f"teacher.checkpoint: {err}")


def _fmt_flops(flops: float) -> str:
    for unit, scale in (("EFLOP", 1e18), ("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)):
        if flops >= scale:
            return f"{flops / scale:,.1f} {unit}"
    return f"{flops:,.0f} FLOP"


def describe_plan(cfg: Config) -> list[str]:
    """The plan as printable lines."""
    params, fwd = forward_flops(cfg)
    d, t, s = cfg.dist, cfg.teacher, cfg.distill
    workers = max(1, d.workers)
    from raypd.distributed.cluster import worker_bundle

    where = (f"{d.workers} Ray Train worker(s) of {worker_bundle(cfg)} each, DeepSpeed ZeRO stage "
             f"{d.zero_stage}, {d.precision}" if d.workers else "in this process (plain PyTorch, no Ray workers)")
    lines = [f"model: {params:,} parameters, {fwd / 1e9:,.2f} GFLOP per image forward "
             f"({cfg.data.channels}x{cfg.data.resolution}x{cfg.data.resolution}, {cfg.model.parameterization} output)",
             f"workers: {where}", ""]
    # a training update is forward + backward (~3 forwards); distillation adds two teacher forwards
    rows = [("stage", "steps", "updates", "batch", "per worker", "lr", "compute")]
    total = 0.0
    if not t.checkpoint and t.source != "diffusers":
        flops = t.updates * t.batch_size * 3 * fwd
        total += flops
        rows.append(("teacher", str(t.sampling_steps), f"{t.updates:,}", str(t.batch_size),
                     str(t.batch_size // workers), f"{t.lr:g}", _fmt_flops(flops)))
    for rnd in plan_rounds(s):
        flops = rnd.updates * s.batch_size * 5 * fwd
        total += flops
        rows.append((f"round {rnd.index}", f"{rnd.teacher_steps}->{rnd.student_steps}", f"{rnd.updates:,}",
                     str(s.batch_size), str(s.batch_size // workers), f"{s.lr:g}", _fmt_flops(flops)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    gpu_hours = total / (PEAK_FLOPS * UTILISATION) / 3600
    lines += ["", f"estimated compute: {_fmt_flops(total)} in all, about {gpu_hours:,.3g} A100-hours "
              f"(assuming {UTILISATION:.0%} of the {PEAK_FLOPS / 1e12:.0f} TFLOP/s bf16 peak; "
              f"{gpu_hours / workers:,.3g} h of wall time on {workers} such GPUs)",
              f"evaluation: {cfg.eval.num_samples} samples per point, {cfg.eval.extractor} features, seed {cfg.eval.seed}"]
    return lines


def check_storage(cfg: Config, checks: Checks) -> None:
    from raypd.runs import RunStateError, check_storage_path, run_uri

    uri = run_uri(cfg)
    if uri is not None:
        from raypd.storage import Bucket

        try:
            count = len(Bucket(uri).files())
            checks.passed.append(f"storage: {uri} (reachable; {count} run file(s) there)")
        except Exception as err:  # noqa: BLE001 - an unreachable bucket is reported, not raised
            checks.warnings.append(f"storage: could not list {uri} ({type(err).__name__}: {err}); check the "
                                   "credentials in the environment (AWS_*, GOOGLE_APPLICATION_CREDENTIALS)")
        return
    try:
        check_storage_path(cfg.run.storage_path)
        checks.passed.append(f"storage: {Path(cfg.run.storage_path).absolute()}")
    except RunStateError as err:
        checks.errors.append(f"run.storage_path: {err}")
        return
    from raypd.distributed.trainer import StageError, check_stages_in_progress

    try:
        check_stages_in_progress(cfg, Path(cfg.run.storage_path).absolute() / cfg.run.name)
    except StageError as err:
        checks.errors.append(f"dist: {err}")


def check_cluster(cfg: Config, checks: Checks) -> None:
    """With a cluster to ask (RAY_ADDRESS, as under ``ray job submit``): can its nodes host the workers?"""
    import os

    if not cfg.dist.workers:
        return
    if not os.environ.get("RAY_ADDRESS"):
        checks.passed.append("cluster: not asked (no RAY_ADDRESS); the run checks it before training")
        return
    from raypd.distributed.cluster import ClusterError, ensure_ray

    try:
        cluster = ensure_ray(cfg, wait=False)
        here = cluster.here
        if here >= cfg.dist.workers:
            checks.passed.append(f"cluster: its nodes can host dist.workers={cfg.dist.workers}")
        else:
            most = "" if cluster.most is None else f" (its node types can host {cluster.most} at most)"
            checks.passed.append(f"cluster: its nodes up now host {here} of dist.workers={cfg.dist.workers}; the run "
                                 f"asks the autoscaler for the rest{most} and waits up to dist.scale_timeout_s="
                                 f"{cfg.dist.scale_timeout_s:g}")
    except ClusterError as err:
        checks.errors.append(f"dist.workers: {err}")
    except Exception as err:  # noqa: BLE001 - an unreachable cluster is reported, not raised
        checks.warnings.append(f"cluster: could not ask {os.environ['RAY_ADDRESS']} ({type(err).__name__}: {err})")


def dry_run(cfg: Config) -> int:
    """Print checks and plan; 0 when nothing is wrong, 2 when a check failed."""
    checks = Checks()
    check_data(cfg, checks)
    check_teacher(cfg, checks)
    plan_cfg = planned_config(cfg, checks)
    check_storage(cfg, checks)
    check_cluster(cfg, checks)
    from raypd.runs import run_uri

    if run_uri(cfg) is not None:
        print(f"run: {run_uri(cfg)}")
    else:
        out = Path(cfg.run.storage_path).absolute() / cfg.run.name
        print(f"run: {out}" + (" (exists: the run would continue there)" if (out / "config.json").is_file() else ""))
    if plan_cfg.teacher.source == "diffusers" and plan_cfg.model.backbone != "diffusers":
        print("(no plan: the diffusers teacher could not be read, see below)")
    else:
        for line in describe_plan(plan_cfg):
            print(line)
    print()
    for line in checks.passed:
        print(f"ok       {line}")
    for line in checks.warnings:
        print(f"warning  {line}")
    for line in checks.errors:
        print(f"error    {line}")
    print("dry run: " + ("problems found, nothing was started" if checks.errors else "nothing was started"))
    return 2 if checks.errors else 0
