"""The engine interface the training loop drives, and its plain-PyTorch implementation.

A DeepSpeed engine (``raypd.distributed.deepspeed``) implements the same members, so the loop never
knows which one it drives.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Protocol

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from raypd.checkpoint import CheckpointError
from raypd.models import Denoiser
from raypd.models.convert import is_legacy
from raypd.train.ema import EMA
from raypd.train.lr import LrSchedule
from raypd.train.objective import Role


class Engine(Protocol):
    model: torch.nn.Module
    """The trainable denoiser as its own loss calls it (through the engine: its backward is the engine's)."""
    network: torch.nn.Module
    """The same weights as another role's loss calls them: a plain forward, whose backward reaches their inputs and
    leaves the engine's gradient machinery alone."""
    ema: EMA | None
    updates: int
    """Updates taken (skipped ones included): where the LR schedule stands."""
    base_lr: float
    skipped_updates: int

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self) -> tuple[float, float]:
        """Clip, update (unless the gradient is not finite), advance the LR; returns (grad_norm, lr)."""
        ...

    def set_lr(self) -> None:
        """Apply ``base_lr`` x the schedule at ``updates`` (after either changed)."""
        ...

    def save(self, directory: Path, client: dict) -> None:
        """This rank's training state (weights, optimizer, EMA) and ``client`` into ``directory``."""
        ...

    def load(self, directory: Path) -> dict:
        """The state ``save`` wrote; returns its ``client``."""
        ...

    def export_state(self) -> dict[str, torch.Tensor]:
        """The model to keep, in fp32 on CPU: the EMA when there is one, else the weights (every rank calls it)."""
        ...

    def update_average(self, average: EMA) -> None:
        """One update of another average of the weights kept outside the engine (every rank calls it)."""
        ...


class PlainEngine:
    """Adam + grad-norm clipping + LR schedule + optional EMA, in bare PyTorch."""

    def __init__(self, model: Denoiser, optimizer: torch.optim.Optimizer, schedule: LrSchedule,
                 base_lr: float, grad_clip: float, ema: EMA | None = None):
        self.model, self.optimizer, self.schedule = model, optimizer, schedule
        self.network = model
        self.base_lr, self.grad_clip, self.ema = base_lr, grad_clip, ema
        self.lr_factors = [float(g.get("lr_factor", 1.0)) for g in optimizer.param_groups]
        """Each parameter group's learning rate as a multiple of the stage's (group 0, the network, at 1)."""
        self.updates = 0
        self.skipped_updates = 0
        self.set_lr()

    def set_lr(self) -> None:
        lr = self.base_lr * self.schedule(self.updates)
        for group, factor in zip(self.optimizer.param_groups, self.lr_factors, strict=True):
            group["lr"] = lr * factor

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> tuple[float, float]:
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip).item()
        lr = self.optimizer.param_groups[0]["lr"]
        if math.isfinite(grad_norm):
            self.optimizer.step()
            if self.ema is not None:
                self.ema.update(self.model)
        else:
            # a NaN/inf gradient would poison Adam's moments and every weight; drop this update
            self.skipped_updates += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.updates += 1
        self.set_lr()
        return grad_norm, lr

    # -- state: safetensors for tensors, JSON for the rest; nothing is unpickled on load ----------------
    def save(self, directory: Path, client: dict) -> None:
        directory = Path(directory)
        tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        if self.ema is not None:
            tensors.update({f"ema.{k}": v.detach().cpu().contiguous() for k, v in self.ema.state_dict().items()})
        opt = self.optimizer.state_dict()
        for index, state in opt["state"].items():
            for key, value in state.items():
                tensors[f"optimizer.{index}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
        save_file(tensors, str(directory / "engine.safetensors"))
        info = {"client": client, "param_groups": opt["param_groups"], "updates": self.updates}
        (directory / "engine.json").write_text(json.dumps(info))

    def load(self, directory: Path) -> dict:
        directory = Path(directory)
        tensors = load_file(str(directory / "engine.safetensors"))
        if is_legacy(tensors, prefix="model.backbone."):
            raise CheckpointError(f"{directory} is a stage checkpoint of raypd's former hand-written UNet, whose "
                                  "optimizer state does not carry over: finish the stage with the version that wrote "
                                  "it, or move the stage's checkpoints aside to restart it (finished stages load as is)")
        info = json.loads((directory / "engine.json").read_text())
        self.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        if self.ema is not None:
            self.ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
        state: dict[int, dict] = {}
        for name, value in tensors.items():
            if name.startswith("optimizer."):
                _, index, key = name.split(".", 2)
                state.setdefault(int(index), {})[key] = value
        groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in info["param_groups"]]
        self.optimizer.load_state_dict({"state": state, "param_groups": groups})
        self.updates = int(info["updates"])
        self.set_lr()
        return info["client"]

    def update_average(self, average: EMA) -> None:
        average.update(self.model)

    def export_state(self) -> dict[str, torch.Tensor]:
        source = self.ema.shadow if self.ema is not None else self.model
        return {k: v.detach().float().cpu().clone() for k, v in source.state_dict().items()}


def param_groups(model: nn.Module, embedding_lr_factor: float = 1.0) -> list[dict]:
    """The optimizer's parameter groups: the network's trainable weights at the stage's learning rate and, for a
    w-conditioned network, its w embedding in a second group at ``embedding_lr_factor`` times that rate
    (``lr_factor``; the group is there whatever the factor, so a stage checkpoint's layout does not hang on it)."""
    network, embedding = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (embedding if ".class_embedding.guidance." in f".{name}" else network).append(p)
    groups = [{"params": network, "lr_factor": 1.0}]
    if embedding:
        groups.append({"params": embedding, "lr_factor": float(embedding_lr_factor)})
    return groups


def build_plain_engine(model: Denoiser, *, lr: float, betas: tuple[float, float], grad_clip: float,
                       schedule: LrSchedule, ema_decay: float | None = None,
                       embedding_lr_factor: float = 1.0) -> PlainEngine:
    """Adam (the paper's optimizer) over the model's trainable weights (see :func:`param_groups`)."""
    optimizer = torch.optim.Adam(param_groups(model, embedding_lr_factor), lr=lr, betas=betas)
    ema = EMA(model, ema_decay) if ema_decay is not None else None
    return PlainEngine(model, optimizer, schedule, lr, grad_clip, ema)


def plain_engine(role: Role, batch_size: int, world: int = 1) -> PlainEngine:
    """The in-process engine of a stage's role (one rank; ``batch_size`` is the stage's, all of it here)."""
    if world != 1:
        raise ValueError("the plain-PyTorch engine runs on one rank; several ranks run DeepSpeed")
    return build_plain_engine(role.model, lr=role.lr, betas=role.betas, grad_clip=role.grad_clip,
                              schedule=role.schedule, ema_decay=role.ema_decay,
                              embedding_lr_factor=role.embedding_lr_factor)
