"""The training loop: one stage (teacher training, a round, a sweep trial) on one rank, whatever the engine.

Every update draws from seeds of (run seed, stream, rank, update); the data stream restarts at every
checkpoint boundary from that update, so a stage resumed at a checkpoint sees the same batches, noise
and dropout as one that ran through. Checkpoints: every rank saves its engine state through a
``store`` (Ray Train in a cluster, a folder in one process), which merges the ranks' files; the final
one adds the consolidated fp32 model. A streak of non-finite updates (on any rank: the gradients are
all-reduced, so every rank sees it) rolls back to the newest checkpoint with a lower learning rate,
kept in the checkpoints that follow. What is trained comes from the stage's ``Objective``: one or more roles,
each on its own engine, stepping in order within an update (each on the updates its ratio gives it), and the
averages of a role's weights that some methods keep (on every rank, and in every checkpoint). The roles roll
back together. Errors that would repeat on a retry (data, configuration, checkpoints) are agreed on by every
rank (``agree``) and raised as one ``StageFailure``.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from raypd.checkpoint import meta_for
from raypd.config import Config
from raypd.data.batch import Batch
from raypd.data.shards import ShardLoader, training_loader
from raypd.train.ema import EMA
from raypd.train.engine import Engine
from raypd.train.failures import DETERMINISTIC, SETTINGS, StageFailure, raise_alone, settings_mismatch
from raypd.train.heldout import heldout_loss, load_heldout
from raypd.train.objective import Nets, Objective, Role
from raypd.train.roles import consolidate_roles, load_roles, save_roles
from raypd.train.seeds import update_seed
from raypd.train.stage import Stage
from raypd.train.step import StepStats, train_step, trains_only
from raypd.train.store import Store

DIVERGED = 1e30
Agree = Callable[[BaseException | None], None]
BuildEngine = Callable[[Role, int], Engine]
"""An engine for a role, given the stage's global batch (plain PyTorch, or DeepSpeed on every rank)."""


@dataclass(frozen=True)
class WorkerGroup:
    """Where a stage's workers run, for a loop run by a worker group that can be restarted (Ray Train): a token of
    the run that started the group (the same through restarts of the group, a new one when the driver runs the stage
    again), the nodes the group holds, and a way to tell which of some nodes have died since (id: how)."""

    run_token: str
    nodes: list[str]
    dead: Callable[[list[str]], dict[str, str]]


class StageLoop:
    """Engines, data and the update loop of one stage on this rank.

    ``objective`` says what the stage trains (``raypd.train.objective``); ``build_engine`` turns each of its roles
    into an engine; ``agree`` makes every rank raise the same failure (one process: raise it); ``settings``, when
    given, are written beside every checkpoint and a checkpoint written under others is refused.
    """

    def __init__(self, cfg: Config, stage: Stage, *, objective: Objective, build_engine: BuildEngine, store: Store,
                 staging: Path, device: torch.device, rank: int = 0, world: int = 1, agree: Agree | None = None,
                 settings: dict | None = None, group: WorkerGroup | None = None):
        self.cfg, self.stage, self.rank, self.world, self.device, self.store = cfg, stage, rank, world, device, store
        self.objective, self.build_engine, self.settings = objective, build_engine, settings
        self.staging = Path(staging)
        self.staging.mkdir(parents=True, exist_ok=True)
        self.agree: Agree = agree or (lambda error: raise_alone(error, stage.label))
        self.every = stage.report_every or cfg.dist.checkpoint_every
        self.patience, self.max_rollbacks, self.rollbacks = cfg.dist.nonfinite_patience, cfg.dist.max_rollbacks, 0
        self.generator = torch.Generator(device)
        self.loader: ShardLoader | None = None
        self.window, self.skipped_before, self.seconds = -1, 0, 0.0
        self.resumed_at: list[int] = []
        """The updates the stage resumed from after interruptions, carried from checkpoint to checkpoint."""
        self.group = group
        self.restarts, self.lost_nodes = 0, {}
        """Restarts of the worker group within one run of the stage, and the nodes it lost (id: kind)."""
        self.losses: dict[int, float] = {}
        """This rank's loss of the first role at every update it stepped (skipped ones included)."""
        self.role_losses: dict[str, dict[int, float]] = {}
        """Every role's loss at every update it stepped."""
        self._build()
        self.heldout = load_heldout(stage.heldout, device) if stage.heldout else None

    def _build(self) -> None:
        """The networks are made locally first, and every rank agrees they could be before the engines' collectives
        start (a rank that cannot read the teacher would otherwise leave the others waiting). Averages are copied
        from their role before its engine partitions or casts it."""
        error, setup = None, None
        try:
            setup = self.objective.setup(self.device)
        except DETERMINISTIC as err:
            error = err
        self.agree(error)
        self.roles, self.frozen, self.follows = setup.roles, setup.frozen, setup.averages
        self.averages = {name: EMA(setup.roles[a.of].model, a.decay, bias_corrected=a.bias_corrected)
                         for name, a in setup.averages.items()}
        self.engines = {name: self.build_engine(role, setup.batch_size) for name, role in setup.roles.items()}
        self.main = setup.main
        self.micro = setup.batch_size // self.world
        for name in self.roles:
            self.role_losses.setdefault(name, {})

    @property
    def engine(self) -> Engine:
        """The engine of the role the stage hands on."""
        return self.engines[self.main]

    @property
    def teacher(self) -> torch.nn.Module | None:
        return self.frozen.get("teacher")

    @property
    def nets(self) -> Nets:
        """Every network, as the first role's loss sees them."""
        return self.nets_for(self.main)

    def nets_for(self, turn: str) -> Nets:
        """Every network as role ``turn``'s loss sees them: its own through its engine, the other roles' as plain
        forwards of their weights."""
        return {**{name: e.model if name == turn else e.network for name, e in self.engines.items()}, **self.frozen,
                **{name: a.shadow for name, a in self.averages.items()}}

    @property
    def skipped_updates(self) -> int:
        """Role updates dropped for a non-finite gradient, all roles together."""
        return sum(e.skipped_updates for e in self.engines.values())

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
                                 pairs=self.objective.reads_pairs)
        if self.loader is not None:
            self.skipped_before += self.loader.skipped_samples
        self.loader, self.window = loader, window
        return iter(loader)

    @property
    def skipped_samples(self) -> int:
        return self.skipped_before + (self.loader.skipped_samples if self.loader is not None else 0)

    # -- checkpoints ---------------------------------------------------------------------------------
    def restore(self, directory: str | Path) -> dict:
        """Load a merged checkpoint into every engine and average; returns the first role's client state
        (``updates``, ``base_lr``, ...)."""
        directory = Path(directory)
        saved = directory / SETTINGS
        if self.settings is not None and saved.is_file():
            problem = settings_mismatch(json.loads(saved.read_text()), self.settings)
            if problem:
                raise StageFailure("settings", f"{self.stage.label} is in progress: {problem}")
        self.clients = load_roles(directory, self.engines, self.main, self.averages, self.device)
        return self.clients[self.main]

    def resume(self) -> int:
        """Continue from the store's newest checkpoint, if any; returns the update it was taken at."""
        error, start = None, 0
        try:
            with self.store.latest() as directory:
                if directory is not None:
                    client = self.restore(directory)
                    start, self.rollbacks = int(client["updates"]), int(client.get("rollbacks", 0))
                    self.seconds = float(client.get("seconds", 0.0))
                    self.resumed_at = [*map(int, client.get("resumed_at", [])), start]
                    self._count_restart(client)
                    for name, engine in self.engines.items():
                        engine.skipped_updates = int(self.clients[name].get("skipped_updates", 0))
        except DETERMINISTIC + (StageFailure,) as err:
            error = err
        self.agree(error)
        if start and self.rank == 0:
            print(f"[{self.stage.label}] resumed from the checkpoint at update {start} of {self.stage.updates}",
                  file=sys.stderr, flush=True)
        return start

    def _count_restart(self, client: dict) -> None:
        """Carry the restart count and lost nodes from the checkpoint; when it was written by this same run of the
        stage (its driver did not change), this start is a restart of the worker group after a failure: the nodes
        the group held then that have died since are the ones it lost."""
        self.restarts, self.lost_nodes = int(client.get("worker_restarts", 0)), dict(client.get("lost_nodes", {}))
        if self.group is None or client.get("run_token") != self.group.run_token:
            return
        self.restarts += 1
        self.lost_nodes.update(self.group.dead(client.get("nodes", [])))

    def save(self, k: int, final_metrics: dict | None) -> str:
        """This rank's part of a checkpoint in a fresh folder; ``final_metrics`` adds the consolidated networks."""
        path = Path(tempfile.mkdtemp(prefix=f"update{k:08d}-", dir=self.staging))
        stage = {"updates": k, "rollbacks": self.rollbacks, "seconds": self.seconds, "resumed_at": self.resumed_at,
                 "worker_restarts": self.restarts, "lost_nodes": self.lost_nodes}
        if self.group is not None:
            stage.update(run_token=self.group.run_token, nodes=self.group.nodes)
        save_roles(path, self.engines, self.main, self.averages, stage, write_shared=self.rank == 0)
        if self.rank == 0 and self.settings is not None:
            (path / SETTINGS).write_text(json.dumps(self.settings))
        if final_metrics is not None:
            s = self.stage
            meta = meta_for(self.cfg, kind="student" if s.distills else "teacher", sampling_steps=s.sampling_steps,
                            round=s.round, metrics=final_metrics,
                            guidance_input=bool(getattr(self.roles[self.main].model, "guidance_input", False)))
            consolidate_roles(path, self.engines, self.main, meta, write=self.rank == 0)
        return str(path)

    def roll_back(self) -> int:
        """Every role back to the newest checkpoint (or the start) with a lower learning rate; returns its update."""
        factor = self.cfg.dist.rollback_lr_factor
        lower = {name: engine.base_lr * factor for name, engine in self.engines.items()}
        with self.store.latest() as directory:
            if directory is None:
                self._build()
                k = 0
            else:
                k = int(self.restore(directory)["updates"])
        for name, engine in self.engines.items():
            engine.base_lr = lower[name]
            engine.set_lr()
        if self.rank == 0:
            print(f"[{self.stage.label}] {self.patience} non-finite updates in a row: rolled back to update {k}, "
                  f"learning rate x{factor} -> {lower[self.main]:.3g}", file=sys.stderr, flush=True)
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

    def _update(self, k: int, batches: Iterator[Batch]) -> dict[str, StepStats]:
        """Update ``k``: every role whose turn it is steps, in order, on the same batch and random stream."""
        seed = update_seed(self.cfg.run.seed, self.stage.stream, self.rank, k)
        torch.manual_seed(seed)  # dropout masks
        self.generator.manual_seed(seed)  # noise and times
        batch = self._next_batch(batches)
        stats = {}
        for name, engine in self.engines.items():
            if k % self.roles[name].every:
                continue
            skipped = engine.skipped_updates
            with trains_only(name, self.engines):
                loss = self.objective.loss(name, self.nets_for(name), batch, self.generator, k)
                stats[name] = train_step(engine, loss)
            if engine.skipped_updates == skipped:
                for average, follow in self.follows.items():
                    if follow.of == name:
                        engine.update_average(self.averages[average])
            self.role_losses[name][k] = stats[name].loss
        if self.main in stats:
            self.losses[k] = stats[self.main].loss
        return stats

    def run(self, start: int = 0) -> dict:
        """Updates ``start + 1 .. stage.updates``; returns the last window's metrics."""
        updates = self.stage.updates
        batches, window, metrics = self.batches(start), [], {}
        streak, k, began, tick = 0, start, time.perf_counter(), time.perf_counter()
        while k < updates:
            if k % self.every == 0 and k != start:
                batches = self.batches(k)
            k += 1
            skipped = self.skipped_updates
            stats = self._update(k, batches)
            streak = streak + 1 if self.skipped_updates > skipped else 0
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
                             "skipped_updates": self.skipped_updates, "updates": updates,
                             "lr": self.engine.base_lr, "seconds": self.seconds, "resumed_at": self.resumed_at,
                             "worker_restarts": self.restarts,
                             "nodes_lost": sum(kind != "preempted" for kind in self.lost_nodes.values()),
                             "nodes_preempted": sum(kind == "preempted" for kind in self.lost_nodes.values()),
                             **{f"{name}_final_loss": metrics[f"{name}_loss"] for name in self.engines
                                if name != self.main}}
                self.store.report(metrics, self.save(k, final), final=final is not None)
                window, tick = [], time.perf_counter()
        return metrics

    def _numerical_message(self) -> str:
        return (f"{self.stage.label}: the loss or gradients stayed non-finite ({self.patience} updates in a row) "
                f"after {self.max_rollbacks} roll-backs with a lower learning rate; check the teacher checkpoint and "
                "data, or lower the learning rate")

    def _progress(self, k: int, updates: int, start: int, began: float, stats: dict[str, StepStats]) -> None:
        if self.rank == 0 and (k % self.cfg.run.log_every == 0 or k == updates):
            rate = (k - start) / max(1e-9, time.perf_counter() - began)
            roles = " ".join(f"{'' if name == self.main else name + ' '}loss {s.loss:.4f} grad {s.grad_norm:.3f} "
                             f"lr {s.lr:.2e}" for name, s in stats.items())
            print(f"[{self.stage.label}] {k}/{updates} {roles} {rate:.2f} upd/s "
                  f"({rate * self.micro * self.world:.0f} samples/s), "
                  f"{(updates - k) / max(rate, 1e-9):.0f}s left", file=sys.stderr, flush=True)

    def _window_metrics(self, k: int, window: list[dict[str, StepStats]], elapsed: float) -> dict:
        """The window's means per role: the first role's as ``loss``, ``grad_norm``, ``lr``, the others' prefixed
        with their name (``critic_loss``)."""
        metrics = {"update": k, "samples_per_s": len(window) * self.micro * self.world / max(elapsed, 1e-9),
                   "skipped_samples": self.skipped_samples, "skipped_updates": self.skipped_updates}
        for name in self.engines:
            seen = [w[name] for w in window if name in w]
            finite = [s.grad_norm for s in seen if math.isfinite(s.grad_norm)]
            prefix = "" if name == self.main else f"{name}_"
            metrics.update({f"{prefix}loss": sum(s.loss for s in seen) / max(1, len(seen)),
                            f"{prefix}grad_norm": sum(finite) / max(1, len(finite)),
                            f"{prefix}lr": seen[-1].lr if seen else 0.0})
        if self.heldout is not None:
            metrics["heldout_loss"] = self._heldout_loss()
        return metrics

    def _heldout_loss(self) -> float:
        """Held-out loss of the first role (every rank computes it: ZeRO-3 gathers parameters collectively).

        A diverged student reports a huge finite number rather than NaN, so schedulers rank it last.
        """
        value = heldout_loss(self.objective, self.nets, self.heldout, trained=self.engine.model)
        return value if math.isfinite(value) and value < DIVERGED else DIVERGED
