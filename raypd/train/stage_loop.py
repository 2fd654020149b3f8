"""The training loop: one stage (teacher training, a round, a sweep trial) on one rank, whatever the engine.

Every update draws from seeds of (run seed, stream, rank, update); the data stream restarts at every
checkpoint boundary from that update, so a stage resumed at a checkpoint sees the same batches, noise
and dropout as one that ran through. Checkpoints: every rank saves its engine state through a
``store`` (Ray Train in a cluster, a folder in one process), which merges the ranks' files; the final
one adds the consolidated fp32 model. A streak of non-finite updates (on any rank: the gradients are
all-reduced, so every rank sees it) rolls back to the newest checkpoint with a lower learning rate,
kept in the checkpoints that follow. A TRACT phase also keeps its self-teacher, a bias-corrected EMA of the
student, on every rank (every rank computes targets with it) and in every checkpoint. A guided teacher trains
with label dropout, and a guided distillation's stages draw a guidance weight per example, from the same seeds. Errors that would
repeat on a retry (data, configuration, checkpoints) are agreed on by every rank (``agree``) and raised as
one ``StageFailure``.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors.torch import load_file, save_file

from raypd.checkpoint import meta_for, save_checkpoint
from raypd.config import Config
from raypd.data.batch import Batch
from raypd.data.shards import ShardLoader, training_loader
from raypd.models.build import null_class
from raypd.train.ema import EMA
from raypd.train.engine import Engine
from raypd.train.failures import DETERMINISTIC, SETTINGS, StageFailure, raise_alone, settings_mismatch
from raypd.train.heldout import heldout_loss, load_heldout
from raypd.train.seeds import update_seed
from raypd.train.setup import StageSetup, prepare_stage
from raypd.train.stage import Stage
from raypd.train.step import StepStats, guidance_for, teacher_autocast_dtype, train_step
from raypd.train.store import Store

DIVERGED = 1e30
SELF_TEACHER = "self_teacher.safetensors"
Agree = Callable[[BaseException | None], None]


class StageLoop:
    """Engine, data and the update loop of one stage on this rank.

    ``build_engine`` turns the stage's set-up into an engine (plain PyTorch, or DeepSpeed on every rank);
    ``agree`` makes every rank raise the same failure (one process: raise it); ``settings``, when given,
    are written beside every checkpoint and a checkpoint written under others is refused.
    """

    def __init__(self, cfg: Config, stage: Stage, *, build_engine: Callable[[StageSetup], Engine], store: Store,
                 staging: Path, device: torch.device, rank: int = 0, world: int = 1, agree: Agree | None = None,
                 settings: dict | None = None):
        self.cfg, self.stage, self.rank, self.world, self.device, self.store = cfg, stage, rank, world, device, store
        self.build_engine, self.settings = build_engine, settings
        self.staging = Path(staging)
        self.staging.mkdir(parents=True, exist_ok=True)
        self.agree: Agree = agree or (lambda error: raise_alone(error, stage.label))
        self.every = stage.report_every or cfg.dist.checkpoint_every
        self.patience, self.max_rollbacks, self.rollbacks = cfg.dist.nonfinite_patience, cfg.dist.max_rollbacks, 0
        self.logsnr_fn = cfg.diffusion.logsnr_fn()
        self.teacher_dtype = teacher_autocast_dtype(cfg.dist.teacher_dtype, device)
        self.generator = torch.Generator(device)
        self.loader: ShardLoader | None = None
        self.window, self.skipped_before, self.seconds = -1, 0, 0.0
        self.losses: dict[int, float] = {}
        """This rank's loss at every update it ran (skipped ones included)."""
        self.engine, self.teacher, self.micro, self.self_teacher = self._build()
        self.heldout = load_heldout(stage.heldout, device) if stage.heldout else None

    def _build(self) -> tuple[Engine, torch.nn.Module | None, int, EMA | None]:
        """The model is made locally first, and every rank agrees it could be before the engine's collectives
        start (a rank that cannot read the teacher would otherwise leave the others waiting). A TRACT self-teacher
        is copied from the student before the engine partitions or casts it."""
        error, setup = None, None
        try:
            setup = prepare_stage(self.cfg, self.stage, self.device)
        except DETERMINISTIC as err:
            error = err
        self.agree(error)
        self_teacher = None
        if self.stage.distills and self.cfg.distill.method == "tract" and not self.stage.guidance:
            self_teacher = EMA(setup.model, self.cfg.distill.self_teacher_ema, bias_corrected=True)
        return self.build_engine(setup), setup.teacher, setup.batch_size // self.world, self_teacher

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
        loader = training_loader(self.stage.shards, self.cfg.data, batch_size=self.micro, seed=self.cfg.run.seed,
                                 stream=self.stage.stream, rank=self.rank, world_size=self.world, epoch=window,
                                 pairs=self.stage.distills and self.cfg.distill.method == "denoising_student")
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
        saved = Path(directory) / SETTINGS
        if self.settings is not None and saved.is_file():
            problem = settings_mismatch(json.loads(saved.read_text()), self.settings)
            if problem:
                raise StageFailure("settings", f"{self.stage.label} is in progress: {problem}")
        client = self.engine.load(Path(directory))
        if self.self_teacher is not None:
            self.self_teacher.load_state_dict(load_file(str(Path(directory) / SELF_TEACHER), device=str(self.device)))
            self.self_teacher.count = int(client["self_teacher_updates"])
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
                    self.seconds = float(client.get("seconds", 0.0))
                    self.engine.skipped_updates = int(client.get("skipped_updates", 0))
        except DETERMINISTIC + (StageFailure,) as err:
            error = err
        self.agree(error)
        if start and self.rank == 0:
            print(f"[{self.stage.label}] resumed from the checkpoint at update {start} of {self.stage.updates}",
                  file=sys.stderr, flush=True)
        return start

    def save(self, k: int, final_metrics: dict | None) -> str:
        """This rank's part of a checkpoint in a fresh folder; ``final_metrics`` adds the consolidated model."""
        path = tempfile.mkdtemp(prefix=f"update{k:08d}-", dir=self.staging)
        client = {"updates": k, "base_lr": self.engine.base_lr, "rollbacks": self.rollbacks, "seconds": self.seconds,
                  "skipped_updates": self.engine.skipped_updates}
        if self.self_teacher is not None:
            client["self_teacher_updates"] = self.self_teacher.count
            if self.rank == 0:
                save_file({name: v.detach().cpu().contiguous() for name, v in self.self_teacher.state_dict().items()},
                          str(Path(path) / SELF_TEACHER))
        self.engine.save(Path(path), client)
        if self.rank == 0 and self.settings is not None:
            (Path(path) / SETTINGS).write_text(json.dumps(self.settings))
        if final_metrics is not None:
            state = self.engine.export_state()  # collective under ZeRO-3: every rank takes part
            if self.rank == 0:
                s = self.stage
                meta = meta_for(self.cfg, kind="student" if s.distills else "teacher", sampling_steps=s.sampling_steps,
                                round=s.round, metrics=final_metrics,
                                guidance_input=s.distills and self.cfg.distill.guided)
                save_checkpoint(Path(path) / "consolidated", state, meta)
        return path

    def roll_back(self) -> int:
        """Back to the newest checkpoint (or the start) with a lower learning rate; returns its update."""
        lower = self.engine.base_lr * self.cfg.dist.rollback_lr_factor
        with self.store.latest() as directory:
            if directory is None:
                self.engine, self.teacher, self.micro, self.self_teacher = self._build()
                k = 0
            else:
                k = int(self.restore(directory)["updates"])
        self.engine.base_lr, self.engine.updates = lower, k
        self.engine.set_lr()
        if self.rank == 0:
            print(f"[{self.stage.label}] {self.patience} non-finite updates in a row: rolled back to update {k}, "
                  f"learning rate x{self.cfg.dist.rollback_lr_factor} -> {lower:.3g}", file=sys.stderr, flush=True)
        return k

    # -- the loop ------------------------------------------------------------------------------------
    def _next_batch(self, batches: Iterator[Batch]) -> Batch | None:
        error, batch = None, None
        try:
            batch = next(batches).to(self.device)
        except DETERMINISTIC as err:
            error = err
        self.agree(error)
        return batch

    def _update(self, k: int, batches: Iterator[Batch]) -> StepStats:
        seed = update_seed(self.cfg.run.seed, self.stage.stream, self.rank, k)
        torch.manual_seed(seed)  # dropout masks
        self.generator.manual_seed(seed)  # noise and times
        batch = self._next_batch(batches)
        skipped = self.engine.skipped_updates
        stats = train_step(self.engine, batch, weighting=self.cfg.diffusion.weighting, logsnr_fn=self.logsnr_fn,
                           teacher=self.teacher, n_steps=self.stage.student_steps, generator=self.generator,
                           teacher_dtype=self.teacher_dtype, **self._tract(), **self._guidance())
        if self.self_teacher is not None and self.engine.skipped_updates == skipped:
            self.engine.update_average(self.self_teacher)
        self.losses[k] = stats.loss
        return stats

    def _tract(self) -> dict:
        """The self-teacher and the phase's teacher step count, when this stage is a TRACT phase."""
        if self.self_teacher is None:
            return {}
        return {"self_teacher": self.self_teacher.shadow, "teacher_steps": self.stage.steps_of_teacher}

    def _guidance(self) -> dict:
        """Label dropout when training a guided teacher; the w draw of a guided distillation's stages."""
        cfg = self.cfg
        if not self.stage.distills:
            if cfg.model.class_dropout == 0:
                return {}
            return {"class_dropout": cfg.model.class_dropout, "null_class": null_class(cfg.model, cfg.data)}
        guidance = guidance_for(cfg.distill, self.stage.guidance)
        return {} if guidance is None else {"guidance": guidance}

    def run(self, start: int = 0) -> dict:
        """Updates ``start + 1 .. stage.updates``; returns the last window's metrics."""
        updates = self.stage.updates
        batches, window, metrics = self.batches(start), [], {}
        streak, k, began, tick = 0, start, time.perf_counter(), time.perf_counter()
        while k < updates:
            if k % self.every == 0 and k != start:
                batches = self.batches(k)
            k += 1
            skipped = self.engine.skipped_updates
            stats = self._update(k, batches)
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
                now = time.perf_counter()
                self.seconds += now - tick
                metrics = self._window_metrics(k, window, now - tick)
                final = None
                if k == updates:
                    final = {"final_loss": metrics["loss"], "skipped_samples": self.skipped_samples,
                             "skipped_updates": self.engine.skipped_updates, "updates": updates,
                             "lr": self.engine.base_lr, "seconds": self.seconds}
                self.store.report(metrics, self.save(k, final), final=final is not None)
                window, tick = [], time.perf_counter()
        return metrics

    def _numerical_message(self) -> str:
        return (f"{self.stage.label}: the loss or gradients stayed non-finite ({self.patience} updates in a row) "
                f"after {self.max_rollbacks} roll-backs with a lower learning rate; check the teacher checkpoint and "
                "data, or lower the learning rate")

    def _progress(self, k: int, updates: int, start: int, began: float, stats: StepStats) -> None:
        if self.rank == 0 and (k % self.cfg.run.log_every == 0 or k == updates):
            rate = (k - start) / max(1e-9, time.perf_counter() - began)
            print(f"[{self.stage.label}] {k}/{updates} loss {stats.loss:.4f} grad {stats.grad_norm:.3f} "
                  f"lr {stats.lr:.2e} {rate:.2f} upd/s ({rate * self.micro * self.world:.0f} samples/s), "
                  f"{(updates - k) / max(rate, 1e-9):.0f}s left", file=sys.stderr, flush=True)

    def _window_metrics(self, k: int, window: list[StepStats], elapsed: float) -> dict:
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
        value = heldout_loss(self.engine.model, self.teacher, self.heldout, n_steps=self.stage.student_steps,
                             weighting=self.cfg.diffusion.weighting, logsnr_fn=self.logsnr_fn, **self._tract(),
                             guided_target=self.stage.guidance)
        return value if math.isfinite(value) and value < DIVERGED else DIVERGED
