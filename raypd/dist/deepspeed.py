"""DeepSpeed behind the same small Engine interface the plain-PyTorch engine implements.

The DeepSpeed config is generated from typed arguments and checked after initialisation:
DeepSpeed silently ignores a misspelled key (a run would quietly train as ZeRO-0), so the stage
it actually runs is asserted. The teacher never enters DeepSpeed: it stays a frozen plain module
beside the engine (under ZeRO-3 it must not be partitioned).
"""

from __future__ import annotations

import math
import os
from typing import Literal

import torch

from raypd.models import Denoiser
from raypd.train.ema import EMA
from raypd.train.lr import LrSchedule

Precision = Literal["fp32", "bf16", "fp16"]


def ds_config(*, global_batch: int, world_size: int, zero_stage: int, precision: Precision, grad_clip: float,
              offload_optimizer: bool = False, offload_params: bool = False) -> dict:
    """The DeepSpeed config for a global batch split evenly over ``world_size`` ranks (no accumulation)."""
    if global_batch % world_size:
        raise ValueError(f"the global batch {global_batch} does not split evenly over {world_size} workers")
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"ZeRO stage must be 0, 1, 2 or 3, got {zero_stage}")
    if offload_params and zero_stage != 3:
        raise ValueError("parameter offload needs ZeRO stage 3")
    zero: dict = {"stage": zero_stage}
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if offload_params:
        zero["offload_param"] = {"device": "cpu"}
    return {
        "train_batch_size": global_batch,
        "train_micro_batch_size_per_gpu": global_batch // world_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


class DeepSpeedEngine:
    """The Engine interface (model, backward, step) over a deepspeed engine."""

    def __init__(self, engine, schedule: LrSchedule, base_lr: float, ema: EMA | None = None):
        self.engine, self.schedule, self.base_lr, self.ema = engine, schedule, base_lr, ema
        self.model = engine  # calling the engine runs the wrapped Denoiser's forward with ZeRO's hooks
        self.updates = 0
        self.skipped_updates = 0
        self._set_lr()

    def _set_lr(self) -> None:
        for group in self.engine.optimizer.param_groups:
            group["lr"] = self.base_lr * self.schedule(self.updates)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> tuple[float, float]:
        lr = self.engine.optimizer.param_groups[0]["lr"]
        self.engine.step()  # clips to gradient_clipping and updates (fp16 skips overflowing steps itself)
        norm = self.engine.get_global_grad_norm()
        grad_norm = float(norm) if norm is not None else math.nan
        if not math.isfinite(grad_norm):
            self.skipped_updates += 1
        elif self.ema is not None:
            self.ema.update(self.engine.module)
        self.updates += 1
        self._set_lr()
        return grad_norm, lr

    @property
    def module(self) -> Denoiser:
        return self.engine.module


def build_deepspeed_engine(model: Denoiser, *, lr: float, betas: tuple[float, float], schedule: LrSchedule,
                           config: dict, ema_decay: float | None = None) -> DeepSpeedEngine:
    """Initialise DeepSpeed around the student with a client torch Adam (no C++ op build at start-up)."""
    import deepspeed

    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr, betas=betas)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    want = config["zero_optimization"]["stage"]
    if engine.zero_optimization_stage() != want:
        raise RuntimeError(f"DeepSpeed runs ZeRO stage {engine.zero_optimization_stage()}, the config asked for {want}")
    if ema_decay is not None and engine.zero_optimization_stage() == 3:
        raise ValueError("an EMA of the weights (teacher training) needs whole weights on every rank: use ZeRO stage <= 2")
    ema = EMA(engine.module, ema_decay) if ema_decay is not None else None
    return DeepSpeedEngine(engine, schedule, lr, ema)


def init_single_process(port: int = 29511) -> None:
    """A one-rank gloo process group, for running DeepSpeed without Ray (tests, debugging)."""
    import deepspeed

    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                       ("MASTER_PORT", str(port))):
        os.environ.setdefault(key, value)
    deepspeed.init_distributed(dist_backend="gloo")
