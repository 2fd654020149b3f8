"""The job: obtain a teacher, then for each halving round train the student, evaluate it, promote it.

How a stage is trained is chosen once, at start: in this process (``dist.workers=0``), as a Ray Train
run of DeepSpeed workers, or as a Ray Tune sweep of such runs; all three run the same training loop
(``raypd.train.stage_loop``). Resumable: every finished stage leaves a checkpoint in the run directory,
an unfinished one resumes from its last in-stage checkpoint, and a rerun with the same
``run.storage_path``/``run.name`` loads what is done instead of redoing it.
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from raypd.checkpoint import (CheckpointError, add_metrics, check_compatible, load_checkpoint, read_meta,
                              verify_weights, weights_digest)
from raypd.config import Config
from raypd.data.prepare import training_shards
from raypd.data.shards import check_shards
from raypd.eval.evaluate import Evaluator
from raypd.eval.report import write_report
from raypd.models import Denoiser
from raypd.methods import Method, method_for, objective_for
from raypd.runs import (check_and_save_config, finished_summary, interruptions, open_run, record_event,
                        run_uri)
from raypd.train import freeze
from raypd.train.rounds import TRAIN_FORWARDS
from raypd.train.runner import InProcessRunner
from raypd.train.stage import round_stage, teacher_stage


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("run.device=cuda but no CUDA device is visible")
    return torch.device("cuda" if choice != "cpu" and torch.cuda.is_available() else "cpu")


@dataclass
class Context:
    cfg: Config
    out: Path
    device: torch.device
    shards: list[str]
    mirror: Any = None
    """The run's bucket mirror (``raypd.storage.Mirror``); None for a run in a directory."""

    def sync(self) -> None:
        """Push the run's files to its bucket now (nothing for a run in a directory)."""
        if self.mirror is not None:
            self.mirror.sync()

    @property
    def ray_storage(self) -> Path | str:
        """Where Ray Train keeps this run's stages: ``<run>/ray``, in the bucket for a run in one."""
        return self.mirror.locate(str(self.out / "ray")) if self.mirror is not None else self.out / "ray"

    @property
    def logsnr_fn(self):
        return self.cfg.diffusion.logsnr_fn()


def make_runner(ctx: Context):
    """How every stage of this run is trained, chosen once: in this process, or by Ray Train workers."""
    if not ctx.cfg.dist.workers:
        cfg = ctx.cfg
        return InProcessRunner(cfg, ctx.out / "local", ctx.device, objectives=lambda stage: objective_for(cfg, stage),
                               on_commit=ctx.sync)
    from raypd.distributed.trainer import RayTrainRunner

    return RayTrainRunner(ctx.cfg, ctx.ray_storage, mirror=ctx.mirror)


def load_frozen(path: Path, device: torch.device) -> Denoiser:
    model, _ = load_checkpoint(path, map_location=device)
    return freeze(model)


def import_diffusers_teacher(ctx: Context) -> tuple[Denoiser, Path]:
    """A diffusers teacher, imported into the run once; it replaces ``ctx.cfg`` with the config the rounds need
    (the teacher's network and its own discrete noise schedule)."""
    from raypd.hf.teacher import import_teacher, run_config

    path = ctx.out / "teacher"
    if not (path / "meta.json").exists():
        log(f"[teacher] importing the diffusers model {ctx.cfg.teacher.diffusers_path}")
        import_teacher(ctx.cfg, path)
    ctx.cfg = run_config(ctx.cfg, read_meta(path), path)
    log(f"[teacher] loading {path}")
    return load_frozen(path, ctx.device), path


def rss_mib() -> float:
    """The driver's resident memory now (Linux; 0 elsewhere), reported per round to show it does not grow."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return 0.0
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def intact(path: Path, stage: str) -> bool:
    """Whether a finished stage's checkpoint is whole; a damaged one is moved aside (kept) and redone."""
    try:
        read_meta(path)
        verify_weights(path)
        return True
    except CheckpointError as err:
        aside = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}")
        path.rename(aside)
        log(f"[{stage}] WARNING: {err}; moved it to {aside.name} and redoing the {stage}")
        return False


def finished(path: Path, stage: str) -> dict | None:
    """A finished stage's metrics, or None when it has still to run (or its checkpoint was damaged)."""
    if (path / "meta.json").exists() and intact(path, stage):
        return dict(read_meta(path).metrics)
    return None


def obtain_teacher(ctx: Context) -> tuple[Denoiser, Path]:
    """The teacher and its checkpoint directory: given, already trained by this run, imported, or trained now."""
    if ctx.cfg.teacher.source == "diffusers":
        return import_diffusers_teacher(ctx)
    given = ctx.cfg.teacher.checkpoint
    path = Path(given).resolve() if given else ctx.out / "teacher"  # workers do not share the driver's cwd
    if given and ctx.mirror is not None:  # a run in a bucket: its workers read the teacher from there too
        path = copy_given_teacher(path, ctx.out / "given-teacher")
    if not given and finished(path, "teacher") is None:
        t = ctx.cfg.teacher
        log(f"[teacher] training for {t.updates} updates")
        make_runner(ctx).run(teacher_stage(t.updates, t.sampling_steps, ctx.shards), path)
    check_compatible(read_meta(path), ctx.cfg, path)
    log(f"[teacher] loading {path}")
    return load_frozen(path, ctx.device), path


def checkpoint_name(path: Path, out: Path) -> str:
    """Where a checkpoint lies, as the summary records it: relative to the run when inside it, else absolute."""
    path = Path(path).resolve()
    return str(path.relative_to(out.resolve())) if path.is_relative_to(out.resolve()) else str(path)


def copy_given_teacher(source: Path, target: Path) -> Path:
    """A given teacher checkpoint copied into the run (once; again if its weights changed)."""
    import shutil

    verify_weights(source)
    if not (target / "meta.json").is_file() or weights_digest(target) != weights_digest(source):
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(source, target)
        log(f"[teacher] copied the given teacher {source} into the run ({target.name}/)")
    return target


def run_pipeline(cfg: Config, *, mode: str = "auto") -> dict:
    """Teacher (trained or loaded), every round, evaluation after each, and the report; returns the summary.

    ``mode``: ``auto`` continues the run in the storage path when there is one (a finished one is
    left as it is), ``resume`` requires one, ``restart`` moves it aside and starts over.
    """
    cfg = method_for(cfg).complete()
    with open_run(cfg, restart=mode == "restart") as (out, mirror):
        check_and_save_config(cfg, out, resume=mode == "resume")
        done = finished_summary(out)
        if done is not None:
            log(f"[raypd] {run_uri(cfg) or out} has finished already: nothing to do (--restart starts it over)")
            done["report"] = str(out / "report.md")
            return done
        record_event(out, "start")
        return _run(cfg, out, mirror)


def prepare(cfg: Config, out: Path) -> tuple[Context, dict | None]:
    """The run's training shards (written once), checked, and the context every stage shares."""
    readers = max(1, cfg.dist.workers) * max(1, cfg.data.loader_workers)
    shards = training_shards(cfg.data, out / "data", seed=cfg.run.seed, readers=readers)
    d = cfg.data
    # every Ray Train rank reads its own shards with its own loader processes: count them all
    manifest = check_shards(shards, resolution=d.resolution, channels=d.channels, num_classes=d.num_classes,
                            world_size=max(1, cfg.dist.workers), num_workers=d.loader_workers)
    ctx = Context(cfg, out, pick_device(cfg.run.device), shards)
    count = manifest["splits"]["train"]["count"] if manifest else "?"
    log(f"[raypd] run directory {out}, device {ctx.device}, {count} training images of "
        f"{d.channels}x{d.resolution}x{d.resolution} in {len(shards)} shards")
    return ctx, manifest


@contextmanager
def cluster_for(ctx: Context):
    """The Ray cluster the run's stages need (None in local mode): checked before any training, scaled up
    where an autoscaler runs, its request withdrawn when the run ends."""
    cfg = ctx.cfg
    if not (cfg.dist.workers or cfg.sweep.enabled):
        yield None
        return
    from raypd.distributed.cluster import held
    from raypd.distributed.trainer import check_stages_in_progress

    check_stages_in_progress(cfg, ctx.out, ctx.ray_storage)  # a stage checkpointed under other settings cannot go on
    with held(cfg) as cluster:
        yield cluster


def task_lost(out: Path):
    """The Ray task loops' report of a lost task: one event in the run's record of interruptions."""
    return lambda what: record_event(out, "task lost", what=what)


def make_evaluator(ctx: Context, manifest: dict | None, teacher: Denoiser, teacher_digest: str, rounds) -> Evaluator:
    cfg, remote = ctx.cfg, None
    if cfg.dist.workers and cfg.eval.distributed:
        from raypd.distributed.evaluate import RayEvaluation

        remote = RayEvaluation(cfg, workers=cfg.dist.workers, use_gpu=cfg.dist.use_gpu, mirror=ctx.mirror,
                               lost=task_lost(ctx.out))
    return Evaluator(cfg, ctx.out, device=ctx.device, logsnr_fn=ctx.logsnr_fn, urls=ctx.shards, manifest=manifest,
                     teacher=teacher, step_counts=[r.student_steps for r in rounds], remote=remote,
                     teacher_digest=teacher_digest)


def make_pairs(ctx: Context, teacher: Denoiser, teacher_digest: str, count: int) -> list[str]:
    """A method's (noise, teacher sample) pair shards: the run's own when it made them before, else sampled (by Ray
    tasks when the run has workers) and written into it."""
    from raypd.pairs import ensure_pairs

    cfg, remote = ctx.cfg, None
    if cfg.dist.workers:
        from raypd.distributed.evaluate import RayPairs

        remote = RayPairs(cfg, workers=cfg.dist.workers, use_gpu=cfg.dist.use_gpu, lost=task_lost(ctx.out))
    shards = ensure_pairs(cfg, ctx.out, teacher, teacher_digest, count=count, device=ctx.device, remote=remote,
                          log=log)
    ctx.sync()
    return shards


def teacher_compute(path: Path) -> dict:
    """What training the teacher cost, from its checkpoint: examples seen and forward-equivalents (unknown, None,
    for an imported teacher or one whose checkpoint does not say)."""
    meta = read_meta(path)
    updates, batch = meta.metrics.get("updates"), meta.config.get("teacher", {}).get("batch_size")
    if meta.kind != "teacher" or updates is None or batch is None:
        return {"examples": None, "compute": None}
    examples = int(updates) * int(batch)
    return {"examples": examples, "compute": float(TRAIN_FORWARDS * examples)}


def round_row(rnd, stats: dict, path: Path, method: Method, spent: float) -> dict:
    """A round's summary row; ``spent``: the distillation's compute before this round (forward-equivalents)."""
    updates = int(stats.get("updates", rnd.updates))
    # a swept round reports every trial's examples; a plain one trained on updates x batch
    examples = int(stats.get("examples", updates * method.distill.batch_size))
    return {"round": rnd.index, "teacher_steps": rnd.teacher_steps, "student_steps": rnd.student_steps,
            "updates": updates, "lr": stats.get("lr", method.stage_lr(rnd.phase)), "examples": examples,
            "compute": spent + method.forwards_per_example() * examples,
            "wall_seconds": stats.get("wall_seconds", stats["seconds"]), "final_loss": stats["final_loss"],
            "skipped_samples": stats.get("skipped_samples", 0), "checkpoint": path.name,
            "driver_rss_mib": round(rss_mib(), 1), **({"phase": rnd.phase} if rnd.phase else {})}


def _run(cfg: Config, out: Path, mirror=None) -> dict:
    start = time.perf_counter()
    ctx, manifest = prepare(cfg, out)
    ctx.mirror = mirror
    with cluster_for(ctx) as cluster:
        summary = _stages(ctx, manifest, cluster)
    summary["seconds"] = time.perf_counter() - start
    summary["report"] = str(write_report(out, summary))
    return summary


def _stages(ctx: Context, manifest: dict | None, cluster) -> dict:
    """The teacher, then every round: trained (or found finished), evaluated, recorded, promoted."""
    out = ctx.out
    teacher, teacher_path = obtain_teacher(ctx)
    cfg = ctx.cfg  # an imported diffusers teacher fixes the model and the noise schedule
    runner = make_runner(ctx)
    method = method_for(cfg)
    rounds = method.plan()
    ctx.sync()
    teacher_digest = weights_digest(teacher_path)  # read once: the record, the summary and the pairs all name it
    evaluator = make_evaluator(ctx, manifest, teacher, teacher_digest, rounds)
    if cfg.sweep.enabled:
        from raypd.distributed.sweep import SweepRunner

        runner = SweepRunner(cfg, out, runner, evaluator.spec, concurrency=cluster.concurrent_trials(),
                             mirror=ctx.mirror)
    summary = {"run": str(out), "method": method.name, "method_title": method.title, "method_about": method.about,
               "teacher": {"full_steps": evaluator.full_steps, "digest": teacher_digest,
                           "checkpoint": checkpoint_name(teacher_path, out), **teacher_compute(teacher_path)},
               "eval_seed": cfg.eval.seed, "rounds": [], "eval": evaluator.score_teacher()}
    spent, shards = 0.0, ctx.shards
    upfront = method.upfront()
    if upfront is not None:  # the stages read the teacher's pairs instead of the data
        shards = make_pairs(ctx, teacher, teacher_digest, upfront.pairs)
        spent = float(method.upfront_forwards())
        summary["pairs"] = {"count": upfront.pairs, "steps": cfg.distill.start_steps, "compute": spent,
                            "shards": str(Path(shards[0]).parent.relative_to(out))}
    for rnd in rounds:
        path = out / f"round-{rnd.index:02d}-{rnd.student_steps}steps"
        stats = finished(path, f"round {rnd.index}")
        if stats is None:
            stats = runner.run(round_stage(rnd, teacher_path, shards), path)
            add_metrics(path, {"sampler": method.sampler})  # how it samples, for whoever loads it later
        else:
            log(f"[round {rnd.index}] already done, loading {path}")
        student = load_frozen(path, ctx.device)
        summary["eval"].extend(evaluator.student(student, rnd.student_steps, rnd.index, weights_digest(path),
                                                 sampler=method.sampler))
        summary["rounds"].append(round_row(rnd, stats, path, method, spent))
        spent = summary["rounds"][-1]["compute"]
        if hasattr(runner, "chose"):
            runner.chose(rnd.index, rnd.teacher_steps, rnd.student_steps, stats, phase=rnd.phase)
        teacher_path = path  # promotion: the student is the next round's teacher
        ctx.sync()
    sweeps = runner.finish() if hasattr(runner, "finish") else None
    if sweeps:
        summary["sweeps"] = sweeps
    summary["final_checkpoint"] = summary["rounds"][-1]["checkpoint"]
    stages = [out / r["checkpoint"] for r in summary["rounds"]]
    trained = [out / "teacher"] if (out / "teacher" / "meta.json").is_file() else []
    summary["interruptions"] = interruptions(out, trained + stages)
    return summary
