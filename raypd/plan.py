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
from raypd.methods import method_for
from raypd.train.rounds import TRAIN_FORWARDS

PEAK_FLOPS = 312e12
"""Dense bf16 peak of an A100 (the estimate's reference GPU)."""
UTILISATION = 2.5e9 * 3 * 219.4e9 / (32 * 13 * 86400 * PEAK_FLOPS)
"""Fraction of the A100's peak sustained in training, from a published run of the same network: EDM (Karras et
al., NeurIPS 2022, training details in its appendix) trained the 296M-parameter ADM UNet at ImageNet 64, the
network of ``configs/imagenet64.yaml`` (219.4 GFLOP per image forward), on 2,500 Mimg with 32 A100s in about
13 days: 3 forwards per image over 32 x 13 GPU-days is about 14.7% of peak. Sampling is costed the same way."""
UTILISATION_SOURCE = "EDM's ImageNet-64 training, 2,500 Mimg on 32 A100s in ~13 days"
CHECKPOINT_BYTES_PER_PARAM = 16
"""A stage checkpoint: fp32 weights, Adam's two moments and the EMA or bf16 copies (about 16 bytes per parameter)."""
CHECKPOINT_GBPS_PER_NODE = 1.0
"""Write rate of a node's local disk for checkpoints, GB/s (an assumption); training waits for the write."""
GPUS_PER_NODE = 8
LOSS_BUDGET_MIN = 15
"""Minutes of work a checkpoint interval may hold before the dry run warns (a spot preemption loses up to that)."""

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


def eval_costs(cfg: Config) -> dict[str, float]:
    """Image forwards of the run's evaluation by part (``raypd.eval.budget``: the points the run scores, with the
    sample count of each), every guidance weight included, and the images the feature extractor sees."""
    from raypd.eval.budget import EvalPlan

    method = method_for(cfg)
    counts = [r.student_steps for r in method.plan()]
    return EvalPlan.of(cfg).costs(counts, guided_teacher=cfg.guidance_weights() != [None])


def eval_forwards(cfg: Config) -> float:
    """Image forwards of the network in the run's evaluation (feature extraction not included)."""
    costs = eval_costs(cfg)
    return costs["teacher_full"] + costs["teacher_baselines"] + costs["students"]


def eval_lines(cfg: Config, costs: dict[str, float], fwd: float, eval_flops: float, train_flops: float) -> list[str]:
    """What the evaluation scores, with how many samples, and its share of the compute."""
    from raypd.eval.budget import EvalPlan

    e, plan = cfg.eval, EvalPlan.of(cfg)
    share = eval_flops / train_flops if train_flops else float("inf")
    weights = cfg.guidance_weights()
    at = "" if weights == [None] else f", each at {len(weights)} guidance weights"
    if e.max_standard_steps:
        above = (f"{e.many_step_samples:,} samples above {e.max_standard_steps} steps" if e.many_step_samples
                 else f"nothing above {e.max_standard_steps} steps")
        which = f"{e.num_samples:,} samples per point at up to {e.max_standard_steps} steps and the teacher's " \
                f"{plan.full_steps}-step sampler, {above}"
    else:
        which = f"{e.num_samples:,} samples per point at every step count"
    parts = ", ".join(f"{name} {_fmt_flops(costs[key] * fwd)}" for key, name in (
        ("teacher_full", f"the teacher's {plan.full_steps}-step sampler"), ("teacher_baselines", "its DDIM baselines"),
        ("students", "the students")))
    return [f"evaluation: {which}{at}; {e.extractor} features, seed {e.seed}",
            f"evaluation is {share:.1%} of the training compute ({parts}; feature extraction "
            f"{_fmt_flops(eval_flops - fwd * (costs['teacher_full'] + costs['teacher_baselines'] + costs['students']))})"]


def describe_plan(cfg: Config, checks: Checks | None = None) -> list[str]:
    """The plan as printable lines (with a GPU run's memory warnings added to ``checks``)."""
    params, fwd = forward_flops(cfg)
    d, t, s = cfg.dist, cfg.teacher, cfg.distill
    workers = max(1, d.workers)
    from raypd.distributed.cluster import worker_bundle

    where = (f"{d.workers} Ray Train worker(s) of {worker_bundle(cfg)} each, DeepSpeed ZeRO stage "
             f"{d.zero_stage}, {d.precision}" if d.workers else "in this process (plain PyTorch, no Ray workers)")
    lines = [f"model: {params:,} parameters, {fwd / 1e9:,.2f} GFLOP per image forward "
             f"({cfg.data.channels}x{cfg.data.resolution}x{cfg.data.resolution}, {cfg.model.parameterization} output)",
             f"workers: {where}", ""]
    rows = [("stage", "steps", "updates", "batch", "per worker", "lr", "compute")]
    total = 0.0
    trains_teacher = not t.checkpoint and t.source != "diffusers"
    if trains_teacher:
        flops = t.updates * t.batch_size * TRAIN_FORWARDS * fwd
        total += flops
        rows.append(("teacher", str(t.sampling_steps), f"{t.updates:,}", str(t.batch_size),
                     str(t.batch_size // workers), f"{t.lr:g}", _fmt_flops(flops)))
    method = method_for(cfg)
    upfront, rounds = method.upfront(), method.plan()
    if upfront is not None:
        flops = method.upfront_forwards() * fwd
        total += flops
        rows.append(("pairs", f"{s.start_steps}", f"{upfront.pairs:,} samples", "-", "-", "-", _fmt_flops(flops)))
    for rnd in rounds:
        flops = rnd.updates * s.batch_size * method.forwards_per_example() * fwd
        total += flops
        steps = f"{rnd.teacher_steps}->{rnd.student_steps}" + (f" ({rnd.phase})" if rnd.phase else "")
        rows.append((f"round {rnd.index}", steps, f"{rnd.updates:,}",
                     str(s.batch_size), str(s.batch_size // workers),
                     f"{method.stage_lr(rnd.phase):g}", _fmt_flops(flops)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    costs = eval_costs(cfg)
    evals = eval_forwards(cfg)
    from raypd.eval.budget import EXTRACTOR_GFLOP

    extract = costs["extracted_images"] * EXTRACTOR_GFLOP[cfg.eval.extractor] * 1e9
    eval_flops = evals * fwd + extract
    nodes = max(1, -(-workers // GPUS_PER_NODE))
    checkpoints = sum(max(1, u // d.checkpoint_every) for u in
                      ([t.updates] if trains_teacher else []) + [r.updates for r in rounds])
    write_s = checkpoints * params * CHECKPOINT_BYTES_PER_PARAM / (nodes * CHECKPOINT_GBPS_PER_NODE * 1e9)
    rate = PEAK_FLOPS * UTILISATION
    train_h, eval_h, ckpt_h = total / rate / 3600, eval_flops / rate / 3600, write_s * workers / 3600
    gpu_hours = train_h + eval_h + ckpt_h
    lines += ["", f"estimated compute: {_fmt_flops(total)} of training and {_fmt_flops(eval_flops)} of evaluation "
              f"({evals:,.0f} image forwards of the network, {costs['extracted_images']:,.0f} of the feature "
              f"extractor), about {gpu_hours:,.3g} A100-hours: training {train_h:,.3g}, evaluation "
              f"{eval_h:,.3g}, {checkpoints} checkpoint writes {ckpt_h:,.3g} (at {UTILISATION:.1%} of the "
              f"{PEAK_FLOPS / 1e12:.0f} TFLOP/s bf16 peak, from {UTILISATION_SOURCE}; {gpu_hours / workers:,.3g} h of "
              f"wall time on {workers} such GPUs)",
              *eval_lines(cfg, costs, fwd, eval_flops, total)]
    if d.workers and rounds:
        per_update = s.batch_size * method.forwards_per_example() * fwd / (workers * rate)
        # with background uploads, a node lost while a checkpoint is uploading falls back to the one before
        intervals = 2 if d.checkpoint_upload == "async" else 1
        lost = intervals * d.checkpoint_every * per_update / 60
        lines.append(f"checkpoints: every {d.checkpoint_every:,} updates ({d.checkpoint_upload} upload), a lost node "
                     f"costs at most about {lost:,.1f} min of a round's work at the rate above")
        if checks is not None and lost > LOSS_BUDGET_MIN:
            keeps = max(1, int(LOSS_BUDGET_MIN * 60 / (intervals * per_update)))
            checks.warnings.append(f"dist.checkpoint_every: {d.checkpoint_every:,} updates ({d.checkpoint_upload} "
                                   f"upload) risk about {lost:,.0f} min of work, more than {LOSS_BUDGET_MIN} min to "
                                   f"lose to a preemption; about {keeps:,} keeps it under")
    if d.use_gpu:
        from raypd.memory import describe_memory

        memory, warnings = describe_memory(cfg, params, trains_teacher=trains_teacher)
        lines += memory
        if checks is not None:
            checks.warnings.extend(warnings)
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
        for line in describe_plan(plan_cfg, checks):
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
