"""The function every Ray Train worker runs: one stage (teacher training or one round) on DeepSpeed.

Checkpoints every ``dist.checkpoint_every`` updates: every rank saves its own ZeRO shard and
reports it (Ray merges the ranks' files), rank 0 adds the EMA weights; the report is awaited until
committed, so a worker killed right after it resumes from it. A restarted worker group reloads
the newest checkpoint and continues at the same update and LR, with the data stream re-seeded
from that update (so no update repeats the data of an earlier one).
"""

from __future__ import annotations

import contextlib
import math
import shutil
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from raypd.checkpoint import load_checkpoint, meta_for, save_checkpoint
from raypd.config import Config, config_from_dict
from raypd.data.shards import ShardLoader
from raypd.diffusion import make_logsnr_fn
from raypd.dist.deepspeed import build_deepspeed_engine, ds_config
from raypd.models import build_denoiser
from raypd.train import freeze, linear_decay, make_student, train_step, warmup
from raypd.train.heldout import heldout_loss, load_heldout

TAG = "state"
DIVERGED = 1e30


def _engine(cfg: Config, spec: dict, world: int, device: torch.device):
    """(engine, teacher or None) for a teacher-training or a distillation stage."""
    d = cfg.dist
    if spec["kind"] == "teacher":
        t = cfg.teacher
        torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
        model, teacher, lr, betas, schedule, ema = (build_denoiser(cfg.model, cfg.data).to(device).train(), None, t.lr,
                                                    t.adam_betas, warmup(t.warmup_updates), t.ema_decay)
        batch, clip = t.batch_size, t.grad_clip
    else:
        teacher, _ = load_checkpoint(spec["teacher"], map_location=device)
        teacher = freeze(teacher)
        s = cfg.distill
        student = make_student(teacher, cfg.model.parameterization)
        model, lr, betas, schedule, ema = student, s.lr, s.adam_betas, linear_decay(spec["updates"]), None
        batch, clip = s.batch_size, s.grad_clip
    config = ds_config(global_batch=batch, world_size=world, zero_stage=d.zero_stage, precision=d.precision,
                       grad_clip=clip, offload_optimizer=d.offload_optimizer, offload_params=d.offload_params)
    engine = build_deepspeed_engine(model, lr=lr, betas=betas, schedule=schedule, config=config, ema_decay=ema)
    return engine, teacher, batch // world


def _staging(spec: dict, rank: int) -> Path:
    """Where this rank writes checkpoints before Ray persists them; emptied of what a killed run left."""
    root = Path(spec.get("staging") or tempfile.gettempdir()) / f"rank{rank}"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    return root


def _save(engine, cfg: Config, spec: dict, update: int, rank: int, final: bool) -> str:
    """This rank's part of a checkpoint, in a fresh directory; with ``final``, rank 0 adds the consolidated model."""
    path = tempfile.mkdtemp(prefix=f"update{update:08d}-", dir=spec["_staging"])
    engine.engine.save_checkpoint(path, tag=TAG, client_state={"updates": update})
    if rank == 0 and engine.ema is not None:
        save_file({k: v.contiguous() for k, v in engine.ema.state_dict().items()}, str(Path(path) / "ema.safetensors"))
    if final and rank == 0:
        model = engine.ema.shadow if engine.ema is not None else engine.module
        meta = meta_for(cfg, kind=spec["kind"] if spec["kind"] == "teacher" else "student",
                        sampling_steps=spec["sampling_steps"], round=spec.get("round"), metrics=spec.get("metrics", {}))
        save_checkpoint(Path(path) / "consolidated", model, meta)
    return path


def _resume(engine) -> int:
    """Load the newest reported checkpoint, if any; returns the update it was taken at."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as d:
        _, client = engine.engine.load_checkpoint(d, tag=TAG, load_lr_scheduler_states=False)
        if engine.ema is not None:
            engine.ema.load_state_dict(load_file(str(Path(d) / "ema.safetensors")))
    return int(client["updates"])


def _heldout(engine, teacher, heldout, cfg: Config, spec: dict, logsnr_fn) -> float:
    """Held-out distillation loss (every rank computes it: ZeRO-3 gathers parameters collectively).

    A diverged student reports a huge finite number rather than NaN, so schedulers rank it last.
    """
    autocast = (torch.autocast(heldout["x"].device.type, dtype=torch.bfloat16) if cfg.dist.precision == "bf16"
                else contextlib.nullcontext())
    with autocast:
        value = heldout_loss(engine.model, teacher, heldout, n_steps=spec["student_steps"],
                             weighting=cfg.diffusion.weighting, logsnr_fn=logsnr_fn)
    return value if math.isfinite(value) and value < DIVERGED else DIVERGED


class Faults:
    """Counts non-finite updates in a row and the roll-backs they caused."""

    def __init__(self, cfg: Config):
        self.patience, self.limit = cfg.dist.nonfinite_patience, cfg.dist.max_rollbacks
        self.streak, self.rollbacks = 0, 0

    def after_update(self, skipped: bool) -> bool:
        """True when the streak of skipped updates calls for a roll-back."""
        self.streak = self.streak + 1 if skipped else 0
        if self.streak < self.patience:
            return False
        self.streak = 0
        self.rollbacks += 1
        return True

    def exhausted(self) -> bool:
        return self.rollbacks > self.limit

    def message(self, spec: dict) -> str:
        stage = "teacher training" if spec["kind"] == "teacher" else f"round {spec.get('round')}"
        return (f"{stage}: the loss or gradients stayed non-finite ({self.patience} updates in a row) after "
                f"{self.limit} roll-backs with a lower learning rate; check the teacher checkpoint and data, or lower the "
                "learning rate")


def train_loop(spec: dict) -> dict | None:
    """Run by every worker: ``spec`` holds the config, the stage and where its inputs are."""
    import deepspeed
    import ray.train
    import ray.train.torch

    cfg = config_from_dict(spec["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    deepspeed.init_distributed(dist_backend="nccl" if cfg.dist.use_gpu else "gloo")
    engine, teacher, micro = _engine(cfg, spec, world, device)
    spec = {**spec, "_staging": str(_staging(spec, rank))}
    start = _resume(engine)
    if start and rank == 0:
        print(f"[{spec['kind']}] resumed from the checkpoint at update {start} of {spec['updates']}", flush=True)
    engine.updates = start
    engine._set_lr()
    d = cfg.data
    loader = ShardLoader(spec["shards"], batch_size=micro, channels=d.channels, num_classes=d.num_classes, rank=rank,
                         world_size=world, num_workers=d.loader_workers, seed=cfg.run.seed * 1000 + spec["stream"],
                         random_flip=d.random_flip, shuffle_buffer=d.shuffle_buffer, resampled=True, epoch=start,
                         resolution=d.resolution, max_skipped_fraction=d.max_skipped_fraction)
    batches = iter(loader)
    dif = cfg.diffusion
    logsnr_fn = make_logsnr_fn(dif.schedule, logsnr_min=dif.logsnr_min, logsnr_max=dif.logsnr_max, betas=dif.discrete_betas)
    gen = torch.Generator(device).manual_seed(cfg.run.seed * 7919 + 104729 * rank + start + spec["stream"])
    kwargs = dict(weighting=cfg.diffusion.weighting, logsnr_fn=logsnr_fn, teacher=teacher,
                  n_steps=spec.get("student_steps"), generator=gen)
    heldout = load_heldout(spec["heldout"], device) if spec.get("heldout") else None
    every = spec.get("report_every") or cfg.dist.checkpoint_every
    updates, window, tick = spec["updates"], [], time.perf_counter()
    began = tick
    faults = Faults(cfg)
    last_saved, k = None, start
    while k < updates:
        k += 1
        skipped = engine.skipped_updates
        stats = train_step(engine, next(batches).to(device), **kwargs)
        if faults.after_update(engine.skipped_updates > skipped):
            # gradients are all-reduced, so every rank sees the same non-finite streak and rolls back together
            if faults.exhausted():
                return {"error": faults.message(spec)}
            if last_saved is None:
                engine, teacher, micro = _engine(cfg, spec, world, device)
                kwargs["teacher"], k = teacher, 0
            else:
                _, client = engine.engine.load_checkpoint(last_saved, tag=TAG, load_lr_scheduler_states=False)
                k = int(client["updates"])
            engine.base_lr *= cfg.dist.rollback_lr_factor
            engine.updates = k
            engine._set_lr()
            window = []
            if rank == 0:
                print(f"[{spec['kind']}] {faults.patience} non-finite updates in a row: rolled back to update {k}, "
                      f"learning rate x{cfg.dist.rollback_lr_factor} -> {engine.base_lr:.3g}", flush=True)
            continue
        window.append(stats)
        if rank == 0 and (k % cfg.run.log_every == 0 or k == updates):
            rate = (k - start) / max(1e-9, time.perf_counter() - began)
            label = spec["kind"] if spec["kind"] == "teacher" else f"round {spec.get('round')}"
            print(f"[{label}] {k}/{updates} loss {stats.loss:.4f} lr {stats.lr:.2e} {rate:.2f} upd/s "
                  f"({rate * micro * world:.0f} samples/s), {(updates - k) / max(rate, 1e-9):.0f}s left", flush=True)
        if k % every == 0 or k == updates:
            elapsed = time.perf_counter() - tick
            metrics = {"update": k, "loss": sum(s.loss for s in window) / len(window),
                       "grad_norm": sum(s.grad_norm for s in window if math.isfinite(s.grad_norm)) / len(window),
                       "lr": stats.lr, "samples_per_s": len(window) * micro * world / elapsed,
                       "skipped_samples": loader.skipped_samples, "skipped_updates": engine.skipped_updates}
            if heldout is not None:
                metrics["heldout_loss"] = _heldout(engine, teacher, heldout, cfg, spec, logsnr_fn)
            if k == updates:
                spec = {**spec, "metrics": {"final_loss": metrics["loss"], "skipped_samples": loader.skipped_samples,
                                            "skipped_updates": engine.skipped_updates}}
            path = _save(engine, cfg, spec, k, rank, final=k == updates)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(path))
            ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
            # persisted by Ray now: keep only the newest local copy (the roll-back target)
            if last_saved is not None:
                shutil.rmtree(last_saved, ignore_errors=True)
            last_saved = path
            window, tick = [], time.perf_counter()
    shutil.rmtree(spec["_staging"], ignore_errors=True)
    return None
