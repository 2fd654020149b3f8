"""A stage's trained roles and averages in a checkpoint folder: written, read back and consolidated.

The first role (the one the stage hands on) is at the top of the folder, as a one-role stage's always was; every
other role in ``roles/<name>/``; each average as ``<name>.safetensors`` beside them. Each role's client state holds
its own update count, rate and skipped updates; the first role's also the stage's update, roll-backs and time, and
the averages' counts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import load_file, save_file

from raypd.checkpoint import CheckpointMeta, save_checkpoint
from raypd.train.ema import EMA
from raypd.train.engine import Engine

ROLES = "roles"
CONSOLIDATED = "consolidated.safetensors"


def role_dir(directory: Path, name: str, main: str) -> Path:
    return directory if name == main else directory / ROLES / name


def save_roles(path: Path, engines: Mapping[str, Engine], main: str, averages: Mapping[str, EMA], stage: dict, *,
               write_shared: bool) -> None:
    """This rank's part of every role, with ``stage`` (``updates``: the stage's update, ...) in the first role's
    client state; ``write_shared``: this rank writes the averages (every rank holds the same)."""
    for name, engine in engines.items():
        client = {"updates": engine.updates, "base_lr": engine.base_lr, "skipped_updates": engine.skipped_updates}
        if name == main:
            client = {**client, **stage, "role_updates": engine.updates,
                      **{f"{a}_updates": average.count for a, average in averages.items()}}
        where = role_dir(path, name, main)
        where.mkdir(parents=True, exist_ok=True)
        engine.save(where, client)
    if write_shared:
        for name, average in averages.items():
            save_file({n: v.detach().cpu().contiguous() for n, v in average.state_dict().items()},
                      str(path / f"{name}.safetensors"))


def load_roles(directory: Path, engines: Mapping[str, Engine], main: str, averages: Mapping[str, EMA],
               device: torch.device) -> dict[str, dict]:
    """Every role and average back from ``directory``, each role at its own update count and rate; returns each
    role's client state."""
    clients = {}
    for name, engine in engines.items():
        own = clients[name] = engine.load(role_dir(directory, name, main))
        # the role's own update count (its schedule's position); the first role's ``updates`` is the stage's
        engine.updates = int(own.get("role_updates", own["updates"]))
        engine.base_lr = float(own.get("base_lr", engine.base_lr))
        engine.set_lr()
    for name, average in averages.items():
        average.load_state_dict(load_file(str(directory / f"{name}.safetensors"), device=str(device)))
        average.count = int(clients[main][f"{name}_updates"])
    return clients


def consolidate_roles(path: Path, engines: Mapping[str, Engine], main: str, meta: CheckpointMeta, *,
                      write: bool) -> None:
    """Every role's whole fp32 weights: the first as the stage's checkpoint (``consolidated/``, with ``meta``), the
    others as ``roles/<name>/consolidated.safetensors``. Every rank takes part (a collective under ZeRO-3);
    ``write``: this rank writes them."""
    for name, engine in engines.items():
        state = engine.export_state()
        if not write:
            continue
        if name == main:
            save_checkpoint(path / "consolidated", state, meta)
        else:
            save_file(state, str(path / ROLES / name / CONSOLIDATED))
