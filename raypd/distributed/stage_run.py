"""One stage (teacher training or one round) on one rank of a DeepSpeed process group.

The loop: every update draws from seeds of (run seed, stream, rank, update); the data stream
restarts at every checkpoint boundary from that update, so a stage resumed at a checkpoint sees
the same batches, noise and dropout as one that ran through. Checkpoints: every rank saves its
ZeRO shard through a ``store`` (Ray Train's reporting in a cluster) which merges the ranks' files;
the final one adds the consolidated fp32 student. A streak of non-finite updates (on any rank: the
gradients are all-reduced, so every rank sees it) rolls back to the newest merged checkpoint with a
lower learning rate, kept in the checkpoints that follow. Errors that would repeat on a retry
(data, configuration, checkpoints) are agreed on by every rank and returned as one message.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import ContextManager, Iterator, Protocol

import torch
from safetensors.torch import load_file, save_file

from raypd.checkpoint import CheckpointError, load_checkpoint, meta_for, save_checkpoint
from raypd.config import Config
from raypd.data.batch import Batch
from raypd.data.shards import ShardLoader, training_loader
from raypd.distributed.deepspeed import DeepSpeedEngine, build_deepspeed_engine, ds_config
from raypd.distributed.guards import DETERMINISTIC, SETTINGS, StageFailure, agree, dist_settings, settings_mismatch
from raypd.models import build_denoiser
from raypd.train import freeze, linear_decay, make_student, train_step, warmup
from raypd.train.heldout import heldout_loss, load_heldout
from raypd.train.step import teacher_autocast_dtype
from raypd.train.seeds import update_seed

TAG = "state"
DIVERGED = 1e30


class Store(Protocol):
    """Where merged checkpoints live: reporting one, and reading the newest back."""

    def report(self, metrics: dict, path: str) -> None: ...

    def latest(self) -> ContextManager[str | None]: ...


class StageRun:
    """Engine, data and the update loop of one stage on this rank."""

    def __init__(self, cfg: Config, spec: dict, *, rank: int, world: int, device: torch.device, store: Store,
                 staging: Path):
        self.cfg, self.spec, self.rank, self.world, self.device, self.store = cfg, spec, rank, world, device, store
        self.staging = staging
        staging.mkdir(parents=True, exist_ok=True)
        self.kind = spec["kind"]
        self.label = "teacher" if self.kind == "teacher" else f"round {spec.get('round')}"
        self.every = spec.get("report_every") or cfg.dist.checkpoint_every
        self.patience, self.max_rollbacks, self.rollbacks = cfg.dist.nonfinite_patience, cfg.dist.max_rollbacks, 0
        self.logsnr_fn = cfg.diffusion.logsnr_fn()
        self.teacher_dtype = teacher_autocast_dtype(cfg.dist.teacher_dtype, device)
        self.generator = torch.Generator(device)
        self.loader: ShardLoader | None = None
        self.window = -1
        self.skipped_before = 0
        self.losses: dict[int, float] = {}
        """This rank's loss at every update it ran (skipped ones included)."""
        self.engine, self.teacher, self.micro = self._build()
        self.heldout = load_heldout(spec["heldout"], device) if spec.get("heldout") else None

    # -- set-up -------------------------------------------------------------------------------------
    def _build(self) -> tuple[DeepSpeedEngine, torch.nn.Module | None, int]:
        """The engine: the model is made locally first, and every rank agrees it could be before DeepSpeed's
        collectives start (a rank that cannot read the teacher would otherwise leave the others waiting)."""
        error, prepared = None, None
        try:
            prepared = self._prepare()
        except DETERMINISTIC as err:
            error = err
        self.agree(error)
        model, teacher, lr, betas, schedule, ema, batch, clip = prepared
        d = self.cfg.dist
        config = ds_config(global_batch=batch, world_size=self.world, zero_stage=d.zero_stage, precision=d.precision,
                           grad_clip=clip, offload_optimizer=d.offload_optimizer, offload_params=d.offload_params)
        engine = build_deepspeed_engine(model, lr=lr, betas=betas, schedule=schedule, config=config, ema_decay=ema)
        return engine, teacher, batch // self.world

    def _prepare(self) -> tuple:
        cfg, spec = self.cfg, self.spec
        torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
        if self.kind == "teacher":
            t = cfg.teacher
            model = build_denoiser(cfg.model, cfg.data).to(self.device).train()
            teacher, lr, betas, schedule, ema = None, t.lr, t.adam_betas, warmup(t.warmup_updates), t.ema_decay
            batch, clip = t.batch_size, t.grad_clip
        else:
            teacher = freeze(load_checkpoint(spec["teacher"], map_location=self.device)[0])
            s = cfg.distill
            model = make_student(teacher, cfg.model.parameterization)
            lr, betas, schedule, ema = s.lr, s.adam_betas, linear_decay(spec["updates"]), None
            batch, clip = s.batch_size, s.grad_clip
        return model, teacher, lr, betas, schedule, ema, batch, clip

    def batches(self, start: int) -> Iterator[Batch]:
        """The data stream of the checkpoint window that begins after update ``start``.

        Window ``start // every`` reads epoch ``start // every`` of the seeded shard stream, so a stage
        resumed at a checkpoint reads what an uninterrupted one read. The next window is the loader's next
        pass (its processes stay up); a resume or a roll-back starts a loader at its window.
        """
        window = start // self.every
        if self.loader is not None and window == self.window + 1:
            self.window = window
            return iter(self.loader)
        loader = training_loader(self.spec["shards"], self.cfg.data, batch_size=self.micro, seed=self.cfg.run.seed,
                                 stream=self.spec["stream"], rank=self.rank, world_size=self.world, epoch=window)
        if self.loader is not None:
            self.skipped_before += self.loader.skipped_samples
        self.loader, self.window = loader, window
        return iter(loader)

    @property
    def skipped_samples(self) -> int:
        return self.skipped_before + (self.loader.skipped_samples if self.loader is not None else 0)

    # -- checkpoints ---------------------------------------------------------------------------------
    def restore(self, directory: str | Path) -> dict:
        """Load a merged checkpoint into the engine; returns its client state (``updates``, ``base_lr``, ...)."""
        settings = Path(directory) / SETTINGS
        if settings.is_file():
            problem = settings_mismatch(json.loads(settings.read_text()), dist_settings(self.cfg, self.world))
            if problem:
                raise StageFailure("settings", f"{self.label} is in progress: {problem}")
        _, client = self.engine.engine.load_checkpoint(str(directory), tag=TAG, load_lr_scheduler_states=False)
        if client is None:
            raise CheckpointError(f"{directory}: DeepSpeed could not load the checkpoint")
        if self.engine.ema is not None:
            self.engine.ema.load_state_dict(load_file(str(Path(directory) / "ema.safetensors")))
        self.engine.updates = int(client["updates"])
        self.engine.base_lr = float(client.get("base_lr", self.engine.base_lr))
        self.engine.set_lr()
        return client

    def resume(self) -> int:
        """Continue from the store's newest checkpoint, if any; returns the update it was taken at."""
        error, start = None, 0
        try:
            with self.store.latest() as directory:
                if directory is not None:
                    client = self.restore(directory)
                    start, self.rollbacks = int(client["updates"]), int(client.get("rollbacks", 0))
        except DETERMINISTIC + (StageFailure,) as err:
            error = err
        self.agree(error)
        if start and self.rank == 0:
            print(f"[{self.kind}] resumed from the checkpoint at update {start} of {self.spec['updates']}", flush=True)
        return start

    def save(self, k: int, final_metrics: dict | None) -> str:
        """This rank's part of a checkpoint in a fresh directory; ``final_metrics`` adds the consolidated student."""
        path = tempfile.mkdtemp(prefix=f"update{k:08d}-", dir=self.staging)
        client = {"updates": k, "base_lr": self.engine.base_lr, "rollbacks": self.rollbacks}
        self.engine.engine.save_checkpoint(path, tag=TAG, client_state=client)
        if self.rank == 0:
            (Path(path) / SETTINGS).write_text(json.dumps(dist_settings(self.cfg, self.world)))
            if self.engine.ema is not None:
                save_file({k2: v.contiguous() for k2, v in self.engine.ema.state_dict().items()},
                          str(Path(path) / "ema.safetensors"))
        if final_metrics is not None:
            # the fp32 master weights (collective under ZeRO-3, so every rank takes part), or the EMA
            state = self.engine.ema.state_dict() if self.engine.ema is not None else self.engine.master_state_dict()
            if self.rank == 0:
                kind = "teacher" if self.kind == "teacher" else "student"
                meta = meta_for(self.cfg, kind=kind, sampling_steps=self.spec["sampling_steps"],
                                round=self.spec.get("round"), metrics=final_metrics)
                save_checkpoint(Path(path) / "consolidated", state, meta)
        return path

    def roll_back(self) -> int:
        """Back to the newest merged checkpoint (or the start) with a lower learning rate; returns its update."""
        lower = self.engine.base_lr * self.cfg.dist.rollback_lr_factor
        with self.store.latest() as directory:
            if directory is None:
                self.engine, self.teacher, self.micro = self._build()
                k = 0
            else:
                k = int(self.restore(directory)["updates"])
        self.engine.base_lr, self.engine.updates = lower, k
        self.engine.set_lr()
        if self.rank == 0:
            print(f"[{self.kind}] {self.patience} non-finite updates in a row: rolled back to update {k}, "
                  f"learning rate x{self.cfg.dist.rollback_lr_factor} -> {lower:.3g}", flush=True)
        return k

    # -- the loop ------------------------------------------------------------------------------------
    def agree(self, error: BaseException | None) -> None:
        agree(error, world=self.world, label=self.label, device=self.device)

    def _next_batch(self, batches: Iterator[Batch]) -> Batch | None:
        error, batch = None, None
        try:
            batch = next(batches).to(self.device)
        except DETERMINISTIC as err:
            error = err
        self.agree(error)
        return batch

    def run(self, start: int = 0) -> dict:
        """Updates ``start + 1 .. spec['updates']``; returns the last window's metrics."""
        updates = self.spec["updates"]
        batches, window, metrics = self.batches(start), [], {}
        streak, k, began, tick = 0, start, time.perf_counter(), time.perf_counter()
        while k < updates:
            if k % self.every == 0 and k != start:
                batches = self.batches(k)
            k += 1
            seed = update_seed(self.cfg.run.seed, self.spec["stream"], self.rank, k)
            torch.manual_seed(seed)  # dropout masks
            self.generator.manual_seed(seed)  # noise and times
            batch = self._next_batch(batches)
            skipped = self.engine.skipped_updates
            stats = train_step(self.engine, batch, weighting=self.cfg.diffusion.weighting, logsnr_fn=self.logsnr_fn,
                               teacher=self.teacher, n_steps=self.spec.get("student_steps"),
                               generator=self.generator, teacher_dtype=self.teacher_dtype)
            self.losses[k] = stats.loss
            streak = streak + 1 if self.engine.skipped_updates > skipped else 0
            if streak >= self.patience:
                self.rollbacks += 1
                if self.rollbacks > self.max_rollbacks:
                    raise StageFailure("numerical", self._numerical_message())
                k, streak, window = self.roll_back(), 0, []
                batches = self.batches(k)
                continue
            window.append(stats)
            self._progress(k, updates, start, began, stats)
            if k % self.every == 0 or k == updates:
                metrics = self._window_metrics(k, window, tick)
                final = None
                if k == updates:
                    final = {"final_loss": metrics["loss"], "skipped_samples": self.skipped_samples,
                             "skipped_updates": self.engine.skipped_updates}
                self.store.report(metrics, self.save(k, final))
                window, tick = [], time.perf_counter()
        return metrics

    def _numerical_message(self) -> str:
        return (f"{self.label}: the loss or gradients stayed non-finite ({self.patience} updates in a row) after "
                f"{self.max_rollbacks} roll-backs with a lower learning rate; check the teacher checkpoint and data, "
                "or lower the learning rate")

    def _progress(self, k: int, updates: int, start: int, began: float, stats) -> None:
        if self.rank == 0 and (k % self.cfg.run.log_every == 0 or k == updates):
            rate = (k - start) / max(1e-9, time.perf_counter() - began)
            print(f"[{self.label}] {k}/{updates} loss {stats.loss:.4f} lr {stats.lr:.2e} {rate:.2f} upd/s "
                  f"({rate * self.micro * self.world:.0f} samples/s), {(updates - k) / max(rate, 1e-9):.0f}s left",
                  flush=True)

    def _window_metrics(self, k: int, window: list, tick: float) -> dict:
        elapsed = time.perf_counter() - tick
        finite = [s.grad_norm for s in window if math.isfinite(s.grad_norm)]
        metrics = {"update": k, "loss": sum(s.loss for s in window) / max(1, len(window)),
                   "grad_norm": sum(finite) / max(1, len(finite)), "lr": window[-1].lr if window else 0.0,
                   "samples_per_s": len(window) * self.micro * self.world / max(elapsed, 1e-9),
                   "skipped_samples": self.skipped_samples, "skipped_updates": self.engine.skipped_updates}
        if self.heldout is not None:
            metrics["heldout_loss"] = self._heldout_loss()
        return metrics

    def _heldout_loss(self) -> float:
        """Held-out distillation loss (every rank computes it: ZeRO-3 gathers parameters collectively).

        A diverged student reports a huge finite number rather than NaN, so schedulers rank it last.
        """
        value = heldout_loss(self.engine.model, self.teacher, self.heldout, n_steps=self.spec["student_steps"],
                             weighting=self.cfg.diffusion.weighting, logsnr_fn=self.logsnr_fn)
        return value if math.isfinite(value) and value < DIVERGED else DIVERGED


def clear_staging(root: Path) -> Path:
    """This rank's staging folder, emptied of what a killed run left."""
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    return root

