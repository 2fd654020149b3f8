"""A fixed held-out set for comparing students: the same (x, noise, t) for every trial of a round.

Training losses are measured on different random batches, noise and times in every trial, so they
do not compare fairly; the held-out loss is a stage's loss on one frozen draw of all three. What the set
holds, and the loss on it, are the method's (``raypd.methods``); this module stores it and walks it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from raypd.train.objective import Nets, Objective


def save_heldout(heldout: dict[str, Tensor], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(heldout, str(path))
    return path


def load_heldout(path: str | Path, device: torch.device | str = "cpu") -> dict[str, Tensor]:
    return load_file(str(path), device=str(device))


@torch.no_grad()
def heldout_loss(objective: Objective, nets: Nets, heldout: dict[str, Tensor], *, trained: nn.Module,
                 batch_size: int = 256) -> float:
    """The mean of the objective's per-example held-out loss over the set, with the ``trained`` network in eval
    mode (its dropout off) for the duration."""
    was_training = trained.training
    trained.eval()
    total, count = 0.0, 0
    n = next(iter(heldout.values())).shape[0]
    for start in range(0, n, batch_size):
        part = {key: value[start:start + batch_size] for key, value in heldout.items()}
        losses = objective.heldout_losses(nets, part)
        total += losses.sum().item()
        count += losses.shape[0]
    trained.train(was_training)
    return total / count
