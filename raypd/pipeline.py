"""The whole job on one machine in plain PyTorch: teacher, every halving round, evaluation, report.

Resumable at round granularity: every finished stage leaves a checkpoint in the run directory,
and a rerun with the same ``run.storage_path``/``run.name`` loads those instead of redoing them.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from raypd.checkpoint import add_metrics, check_compatible, load_checkpoint, meta_for, read_meta, save_checkpoint
from raypd.config import Config
from raypd.data.prepare import training_shards
from raypd.data.shards import ShardLoader, check_shards
from raypd.diffusion import logsnr_schedule
from raypd.eval.evaluate import Evaluator
from raypd.eval.report import write_report
from raypd.models import Denoiser, build_denoiser
from raypd.train import build_plain_engine, freeze, linear_decay, make_student, plan_rounds, warmup
from raypd.train.loop import run_updates


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
        d = self.cfg.diffusion
        return functools.partial(logsnr_schedule, logsnr_min=d.logsnr_min, logsnr_max=d.logsnr_max)

    def batches(self, batch_size: int, stream: int) -> ShardLoader:
        """An endless, seeded stream of decoded batches; each stage gets its own ``stream``."""
        d = self.cfg.data
        return ShardLoader(self.shards, batch_size=batch_size, channels=d.channels, num_classes=d.num_classes,
                           num_workers=d.loader_workers, seed=self.cfg.run.seed * 1000 + stream,
                           random_flip=d.random_flip, shuffle_buffer=d.shuffle_buffer, resampled=True,
                           resolution=d.resolution)

    def step_kwargs(self, teacher: Denoiser | None = None, n_steps: int | None = None, seed: int = 0) -> dict:
        return dict(weighting=self.cfg.diffusion.weighting, logsnr_fn=self.logsnr_fn, teacher=teacher,
                    n_steps=n_steps, generator=torch.Generator(self.device).manual_seed(seed))


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
    from raypd.dist.trainer import run_stage

    start = time.perf_counter()
    run_stage(ctx.cfg, name=name, spec={**spec, "shards": ctx.shards}, storage=ctx.out / "ray", output=output)
    add_metrics(output, {"seconds": time.perf_counter() - start, "updates": spec["updates"]})
    return read_meta(output).metrics


def obtain_teacher(ctx: Context) -> tuple[Denoiser, Path]:
    """The teacher and its checkpoint directory: given, already trained by this run, or trained now."""
    given = ctx.cfg.teacher.checkpoint
    path = Path(given) if given else ctx.out / "teacher"
    if not given and not (path / "meta.json").exists():
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
    student = make_student(teacher)
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


def run_pipeline(cfg: Config) -> dict:
    """Teacher (trained or loaded), every round, evaluation after each, and the report; returns the summary."""
    out = Path(cfg.run.storage_path) / cfg.run.name
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    shards = training_shards(cfg.data, out / "data", seed=cfg.run.seed)
    d = cfg.data
    manifest = check_shards(shards, resolution=d.resolution, channels=d.channels, num_classes=d.num_classes,
                            world_size=1, num_workers=d.loader_workers)
    ctx = Context(cfg, out, pick_device(cfg.run.device), shards)
    count = manifest["splits"]["train"]["count"] if manifest else "?"
    log(f"[raypd] run directory {out}, device {ctx.device}, {count} training images of "
        f"{d.channels}x{d.resolution}x{d.resolution} in {len(shards)} shards")
    start = time.perf_counter()
    if cfg.dist.workers:
        from raypd.dist.trainer import ensure_ray

        ensure_ray(cfg)  # fails here, before any training, when the cluster cannot host the workers
    teacher, teacher_path = obtain_teacher(ctx)
    rounds = plan_rounds(cfg.distill)
    evaluator = Evaluator(cfg, out, device=ctx.device, logsnr_fn=ctx.logsnr_fn, urls=shards, manifest=manifest,
                          teacher=teacher, step_counts=[r.student_steps for r in rounds])
    summary = {"run": str(out), "teacher": {"full_steps": evaluator.full_steps}, "eval_seed": cfg.eval.seed,
               "rounds": [], "eval": list(evaluator.rows)}
    for rnd in rounds:
        path = out / f"round-{rnd.index:02d}-{rnd.student_steps}steps"
        if (path / "meta.json").exists():
            log(f"[round {rnd.index}] already done, loading {path}")
            model, meta = load_checkpoint(path, map_location=ctx.device)
            student, stats = freeze(model), dict(meta.metrics)
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
        summary["rounds"].append({"round": rnd.index, "teacher_steps": rnd.teacher_steps,
                                  "student_steps": rnd.student_steps, "updates": rnd.updates, "lr": cfg.distill.lr,
                                  "wall_seconds": stats["seconds"], "final_loss": stats["final_loss"],
                                  "skipped_samples": stats.get("skipped_samples", 0), "checkpoint": path.name})
        summary["eval"].append(row)
        teacher, teacher_path = student, path  # promotion: the student is the next round's teacher
    summary["final_checkpoint"] = summary["rounds"][-1]["checkpoint"]
    summary["seconds"] = time.perf_counter() - start
    summary["report"] = str(write_report(out, summary))
    return summary
