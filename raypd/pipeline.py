"""The whole job on one machine in plain PyTorch: teacher, every halving round, evaluation, report.

Resumable at round granularity: every finished stage leaves a checkpoint in the run directory,
and a rerun with the same ``run.storage_path``/``run.name`` loads those instead of redoing them.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from raypd.checkpoint import (CheckpointError, add_metrics, check_compatible, load_checkpoint, meta_for, read_meta,
                              save_checkpoint, verify_weights)
from raypd.config import Config
from raypd.data.prepare import training_shards
from raypd.data.shards import ShardLoader, check_shards, training_loader
from raypd.eval.evaluate import Evaluator
from raypd.eval.report import write_report
from raypd.models import Denoiser, build_denoiser
from raypd.runs import DriverLock, archive_run, check_and_save_config, finished_summary, run_dir
from raypd.train import build_plain_engine, freeze, linear_decay, make_student, plan_rounds, warmup
from raypd.train.loop import run_updates
from raypd.train.step import teacher_autocast_dtype


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

    @property
    def logsnr_fn(self):
        return self.cfg.diffusion.logsnr_fn()

    def batches(self, batch_size: int, stream: int) -> ShardLoader:
        """An endless, seeded stream of decoded batches; each stage gets its own ``stream``."""
        return training_loader(self.shards, self.cfg.data, batch_size=batch_size, seed=self.cfg.run.seed,
                               stream=stream)

    def step_kwargs(self, teacher: Denoiser | None = None, n_steps: int | None = None, seed: int = 0) -> dict:
        return dict(weighting=self.cfg.diffusion.weighting, logsnr_fn=self.logsnr_fn, teacher=teacher,
                    n_steps=n_steps, generator=torch.Generator(self.device).manual_seed(seed),
                    teacher_dtype=teacher_autocast_dtype(self.cfg.dist.teacher_dtype, self.device))


def train_teacher(ctx: Context) -> Denoiser:
    cfg = ctx.cfg.teacher
    torch.manual_seed(ctx.cfg.run.seed)
    model = build_denoiser(ctx.cfg.model, ctx.cfg.data).to(ctx.device).train()
    engine = build_plain_engine(model, lr=cfg.lr, betas=cfg.adam_betas, grad_clip=cfg.grad_clip,
                                schedule=warmup(cfg.warmup_updates), ema_decay=cfg.ema_decay)
    loader = ctx.batches(cfg.batch_size, stream=0)
    result = run_updates(engine, iter(loader), cfg.updates, label="teacher",
                         log_every=ctx.cfg.run.log_every, device=ctx.device,
                         step_kwargs=ctx.step_kwargs(seed=ctx.cfg.run.seed))
    meta = meta_for(ctx.cfg, kind="teacher", sampling_steps=cfg.sampling_steps, round=None,
                    metrics={"final_loss": result.final_loss, "seconds": result.seconds,
                             "skipped_samples": loader.skipped_samples})
    save_checkpoint(ctx.out / "teacher", engine.ema.shadow, meta)
    return freeze(engine.ema.shadow)


def run_on_ray(ctx: Context, name: str, spec: dict, output: Path) -> dict:
    """One stage as a Ray Train run of DeepSpeed workers; returns its wall time and final loss."""
    from raypd.distributed.trainer import run_stage

    start = time.perf_counter()
    run_stage(ctx.cfg, name=name, spec={**spec, "shards": ctx.shards}, storage=ctx.out / "ray", output=output)
    add_metrics(output, {"seconds": time.perf_counter() - start, "updates": spec["updates"]})
    return read_meta(output).metrics


def sweep_stage(ctx: Context, evaluator: Evaluator, teacher_path: Path, rnd, output: Path, centre: dict | None) -> dict:
    """One round as a Ray Tune sweep; the chosen trial's student lands in ``output``; returns its metrics."""
    from raypd.distributed.sweep import sweep_round
    from raypd.train.heldout import make_heldout, save_heldout

    cfg = ctx.cfg
    sweep_dir = ctx.out / "sweeps" / f"round-{rnd.index:02d}"
    heldout = sweep_dir / "heldout.safetensors"
    if not heldout.is_file():  # the same images, noise and times for every trial of the round
        batch = next(iter(ctx.batches(cfg.sweep.heldout_samples, stream=10_000 + rnd.index)))
        save_heldout(make_heldout(batch.x, batch.y, rnd.student_steps, seed=cfg.sweep.seed + rnd.index), heldout)
    spec = {"kind": "round", "teacher": str(teacher_path.resolve()), "round": rnd.index, "updates": rnd.updates,
            "student_steps": rnd.student_steps, "sampling_steps": rnd.student_steps, "stream": 1 + rnd.index,
            "shards": ctx.shards, "heldout": str(heldout.resolve())}
    start = time.perf_counter()
    outcome = sweep_round(cfg, rnd=rnd, spec=spec, sweep_dir=sweep_dir, output=output,
                          eval_spec=evaluator.trial_spec(), centre=centre)
    chosen = outcome.chosen
    add_metrics(output, {"seconds": time.perf_counter() - start, "updates": chosen["updates"], "lr": chosen["lr"],
                         "heldout_loss": chosen["heldout_loss"], "sweep_trials": len(outcome.rows),
                         "sweep_reason": outcome.reason, "sweep_report": str(outcome.report.relative_to(ctx.out))})
    return read_meta(output).metrics


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
    model, _ = load_checkpoint(path, map_location=ctx.device)
    return freeze(model), path


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


def obtain_teacher(ctx: Context) -> tuple[Denoiser, Path]:
    """The teacher and its checkpoint directory: given, already trained by this run, imported, or trained now."""
    if ctx.cfg.teacher.source == "diffusers":
        return import_diffusers_teacher(ctx)
    given = ctx.cfg.teacher.checkpoint
    path = Path(given) if given else ctx.out / "teacher"
    if not given and not ((path / "meta.json").exists() and intact(path, "teacher")):
        t = ctx.cfg.teacher
        log(f"[teacher] training for {t.updates} updates")
        if ctx.cfg.dist.workers:
            run_on_ray(ctx, "teacher", {"kind": "teacher", "stream": 0, "updates": t.updates,
                                        "sampling_steps": t.sampling_steps}, path)
        else:
            return train_teacher(ctx), path
    meta = read_meta(path)
    check_compatible(meta, ctx.cfg, path)
    log(f"[teacher] loading {path}")
    model, _ = load_checkpoint(path, map_location=ctx.device)
    return freeze(model), path


def distill_round(ctx: Context, teacher: Denoiser, rnd) -> tuple[Denoiser, dict]:
    cfg = ctx.cfg.distill
    student = make_student(teacher, ctx.cfg.model.parameterization)
    engine = build_plain_engine(student, lr=cfg.lr, betas=cfg.adam_betas, grad_clip=cfg.grad_clip,
                                schedule=linear_decay(rnd.updates))
    loader = ctx.batches(cfg.batch_size, stream=1 + rnd.index)
    result = run_updates(engine, iter(loader), rnd.updates,
                         label=f"round {rnd.index}: {rnd.teacher_steps}->{rnd.student_steps} steps",
                         log_every=ctx.cfg.run.log_every, device=ctx.device,
                         step_kwargs=ctx.step_kwargs(teacher, rnd.student_steps, seed=ctx.cfg.run.seed + 1 + rnd.index))
    stats = {"final_loss": result.final_loss, "seconds": result.seconds, "updates": rnd.updates,
             "skipped_updates": engine.skipped_updates, "skipped_samples": loader.skipped_samples,
             "losses": result.losses}
    return freeze(student), stats


def run_pipeline(cfg: Config, *, mode: str = "auto") -> dict:
    """Teacher (trained or loaded), every round, evaluation after each, and the report; returns the summary.

    ``mode``: ``auto`` continues the run in the storage path when there is one (a finished one is
    left as it is), ``resume`` requires one, ``restart`` moves it aside and starts over.
    """
    out = run_dir(cfg)
    if mode == "restart":
        archive_run(out)
    with DriverLock(out):
        check_and_save_config(cfg, out, resume=mode == "resume")
        done = finished_summary(out)
        if done is not None:
            log(f"[raypd] {out} has finished already: nothing to do (--restart starts it over)")
            done["report"] = str(out / "report.md")
            return done
        return _run(cfg, out)


def _run(cfg: Config, out: Path) -> dict:
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
    start = time.perf_counter()
    if cfg.dist.workers or cfg.sweep.enabled:
        from raypd.distributed.trainer import check_stages_in_progress, ensure_ray

        check_stages_in_progress(cfg, out)  # a stage checkpointed under other dist settings cannot continue
        ensure_ray(cfg)  # fails here, before any training, when the cluster cannot host the workers
    teacher, teacher_path = obtain_teacher(ctx)
    cfg = ctx.cfg  # an imported diffusers teacher fixes the model and the noise schedule
    rounds = plan_rounds(cfg.distill)
    remote = None
    if cfg.dist.workers and cfg.eval.distributed:
        from raypd.distributed.evaluate import RayEvaluation

        remote = RayEvaluation(cfg, workers=cfg.dist.workers, use_gpu=cfg.dist.use_gpu)
    evaluator = Evaluator(cfg, out, device=ctx.device, logsnr_fn=ctx.logsnr_fn, urls=shards, manifest=manifest,
                          teacher=teacher, step_counts=[r.student_steps for r in rounds], remote=remote)
    summary = {"run": str(out), "teacher": {"full_steps": evaluator.full_steps}, "eval_seed": cfg.eval.seed,
               "rounds": [], "eval": list(evaluator.rows)}
    centre, choices = None, []
    for rnd in rounds:
        path = out / f"round-{rnd.index:02d}-{rnd.student_steps}steps"
        if (path / "meta.json").exists() and intact(path, f"round {rnd.index}"):
            log(f"[round {rnd.index}] already done, loading {path}")
            model, meta = load_checkpoint(path, map_location=ctx.device)
            student, stats = freeze(model), dict(meta.metrics)
        elif cfg.sweep.enabled:
            stats = sweep_stage(ctx, evaluator, teacher_path, rnd, path, centre)
            model, _ = load_checkpoint(path, map_location=ctx.device)
            student = freeze(model)
        elif cfg.dist.workers:
            stats = run_on_ray(ctx, f"round-{rnd.index:02d}", {
                "kind": "round", "teacher": str(teacher_path), "updates": rnd.updates, "round": rnd.index,
                "student_steps": rnd.student_steps, "sampling_steps": rnd.student_steps, "stream": 1 + rnd.index}, path)
            model, _ = load_checkpoint(path, map_location=ctx.device)
            student = freeze(model)
        else:
            student, stats = distill_round(ctx, teacher, rnd)
            save_checkpoint(path, student, meta_for(cfg, kind="student", sampling_steps=rnd.student_steps,
                                                   round=rnd.index, metrics={k: v for k, v in stats.items()
                                                                            if isinstance(v, (int, float))}))
        row = evaluator.student(student, rnd.student_steps, rnd.index)
        if "sweep_report" in stats:
            centre = {"lr": stats["lr"], "updates": int(stats["updates"])}
            choices.append({"round": rnd.index, "teacher_steps": rnd.teacher_steps, "student_steps": rnd.student_steps,
                            "lr": stats["lr"], "updates": int(stats["updates"]), "trials": int(stats["sweep_trials"]),
                            "reason": stats["sweep_reason"], "report": stats["sweep_report"]})
        summary["rounds"].append({"round": rnd.index, "teacher_steps": rnd.teacher_steps,
                                  "student_steps": rnd.student_steps, "updates": int(stats.get("updates", rnd.updates)),
                                  "lr": stats.get("lr", cfg.distill.lr),
                                  "wall_seconds": stats["seconds"], "final_loss": stats["final_loss"],
                                  "skipped_samples": stats.get("skipped_samples", 0), "checkpoint": path.name,
                                  "driver_rss_mib": round(rss_mib(), 1)})
        summary["eval"].append(row)
        teacher, teacher_path = student, path  # promotion: the student is the next round's teacher
    if choices:
        from raypd.eval.sweep_report import write_sweeps_summary

        summary["sweeps"] = str(write_sweeps_summary(out / "sweeps", choices).relative_to(out))
    summary["final_checkpoint"] = summary["rounds"][-1]["checkpoint"]
    summary["seconds"] = time.perf_counter() - start
    summary["report"] = str(write_report(out, summary))
    return summary
