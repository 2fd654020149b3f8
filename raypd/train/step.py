"""ONE optimizer update of one role, and the rule that keeps the other roles' weights out of it."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Mapping

import torch

from raypd.train.engine import Engine


@dataclass
class StepStats:
    loss: float
    grad_norm: float
    lr: float


def train_step(engine: Engine, loss: torch.Tensor) -> StepStats:
    """Backward and one optimizer update (skipped by the engine when the gradient is not finite)."""
    engine.backward(loss)
    grad_norm, lr = engine.step()
    return StepStats(loss=loss.item(), grad_norm=grad_norm, lr=lr)


@contextlib.contextmanager
def trains_only(role: str, engines: Mapping[str, Engine]) -> Iterator[None]:
    """While ``role``'s loss is computed and differentiated, the other roles' weights take no gradient.

    A loss may run another trained network (a student's loss through its critic or discriminator); its
    gradients must reach the inputs of that network, never its weights, which belong to another optimizer.
    With one role there is nothing to do."""
    if len(engines) == 1:
        yield
        return
    held = [p for name, engine in engines.items() if name != role
            for p in engine.network.parameters() if p.requires_grad]
    for p in held:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in held:
            p.requires_grad_(True)
