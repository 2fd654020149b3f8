"""A run of updates with progress: the loop teacher training and every round share."""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from raypd.data.batch import Batch
from raypd.train.engine import Engine
from raypd.train.step import StepStats, train_step


@dataclass
class LoopResult:
    updates: int
    seconds: float
    losses: list[tuple[int, float]] = field(default_factory=list)
    """(update, mean loss since the previous log line)."""

    @property
    def final_loss(self) -> float:
        return self.losses[-1][1] if self.losses else math.nan


def run_updates(engine: Engine, batches: Iterator[Batch], updates: int, *, label: str, log_every: int,
                device: torch.device | str, step_kwargs: dict, print_fn: Callable[[str], None] | None = None
                ) -> LoopResult:
    """``updates`` train steps, printing loss, grad norm, LR, speed and time left every ``log_every``."""
    print_fn = print_fn or (lambda line: print(line, file=sys.stderr, flush=True))
    result = LoopResult(updates=updates, seconds=0.0)
    start = time.perf_counter()
    window: list[StepStats] = []
    for k in range(1, updates + 1):
        stats = train_step(engine, next(batches).to(device), **step_kwargs)
        window.append(stats)
        if k % log_every == 0 or k == updates:
            elapsed = time.perf_counter() - start
            loss = sum(s.loss for s in window) / len(window)
            grad = sum(s.grad_norm for s in window) / len(window)
            result.losses.append((k, loss))
            eta = elapsed / k * (updates - k)
            print_fn(f"[{label}] {k}/{updates} loss {loss:.4f} grad {grad:.3f} lr {stats.lr:.2e} "
                     f"{k / elapsed:.1f} upd/s, {eta:.0f}s left")
            window.clear()
    result.seconds = time.perf_counter() - start
    return result
