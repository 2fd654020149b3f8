"""DeepSpeed behind the same small Engine interface the plain-PyTorch engine implements.

The DeepSpeed config is generated from typed arguments and checked after initialisation:
DeepSpeed silently ignores a misspelled key (a run would quietly train as ZeRO-0), so the stage
it actually runs is asserted. The teacher never enters DeepSpeed: it stays a frozen plain module
beside the engine (under ZeRO-3 it must not be partitioned).

Precision: under bf16 DeepSpeed holds the student's weights in bf16 and the fp32 master weights
in its optimizer; the forward runs under ``torch.autocast`` (the Denoiser still does its
parameterization arithmetic in fp32). The weights a stage hands on are always the fp32 master,
assembled by DeepSpeed (``safe_get_full_fp32_param``), never ``module.state_dict()``: under ZeRO-3
that holds empty placeholders and under bf16 only rounded copies.

Checkpoints: DeepSpeed writes its files with ``torch.save``, and its own loader unpickles them whole. Here they are
read with ``weights_only=True`` and an allowlist of exactly the few DeepSpeed types its files hold, after every file
of the folder has been checked for other types without running it: whoever can write the run's storage can change
numbers, not run code.
"""

from __future__ import annotations

import contextlib
import math
import os
import pickle
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from raypd.checkpoint import CheckpointError
from raypd.models import Denoiser
from raypd.train.ema import EMA
from raypd.train.engine import param_groups
from raypd.train.lr import LrSchedule

Precision = Literal["fp32", "bf16", "fp16"]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
TAG = "state"


def deepspeed_types() -> list[type]:
    """The types other than torch's own that DeepSpeed pickles into a checkpoint: the ZeRO stage, the loss scaler
    (static under fp32/bf16; dynamic under fp16) and ZeRO-1/2's fragment addresses. Found by saving every ZeRO stage,
    fp32/bf16 and offload setting (``get_unsafe_globals_in_checkpoint``); fp16's scaler from DeepSpeed's source."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def check_pickles(directory: Path) -> None:
    """Refuse a DeepSpeed checkpoint folder in which any file names a type outside torch's and ``deepspeed_types``.
    The pickles' opcodes are read, never run; every rank checks every file, so all of them refuse together."""
    files = sorted(Path(directory).rglob("*.pt"))
    if not files:
        raise CheckpointError(f"{directory}: holds no DeepSpeed checkpoint files")
    for path in files:
        try:
            with torch.serialization.safe_globals(deepspeed_types()):
                unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception as err:  # noqa: BLE001 - not a zip-format torch file, truncated, ...
            raise CheckpointError(f"{path}: not a checkpoint file DeepSpeed writes ({type(err).__name__}: {err}); "
                                  "raypd does not load it") from None
        if unsafe:
            raise CheckpointError(
                f"{path} holds pickled {', '.join(sorted(unsafe))}, which DeepSpeed never writes: raypd refuses to "
                "unpickle it (loading it could run code). Whoever can write the run's storage wrote it; delete this "
                "stage's checkpoints to train the stage again from its start")


def weights_only_engine(config):
    """DeepSpeed's torch checkpoint engine, its load unpickling only tensors, containers and ``deepspeed_types``."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    class WeightsOnly(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals(deepspeed_types()):
                return torch.load(path, map_location=map_location, weights_only=True)

    return WeightsOnly(config)


def ds_config(*, global_batch: int, world_size: int, zero_stage: int, precision: Precision, grad_clip: float,
              offload_optimizer: bool = False, offload_params: bool = False, bucket_elements: int = 50_000_000,
              overlap_comm: bool = True) -> dict:
    """The DeepSpeed config for a global batch split evenly over ``world_size`` ranks (no accumulation).

    ``bucket_elements`` sizes ZeRO's gradient-reduce and parameter all-gather buckets, ``overlap_comm``
    lets the reduction of one bucket run while backward fills the next (ZeRO stages 1-3).

    With offload it carries DeepSpeed's switch that allows a torch optimizer on the offloaded state
    (its own CPU Adam needs a compiled op); ``build_deepspeed_engine`` drops it where that op is built.
    """
    if global_batch % world_size:
        raise ValueError(f"the global batch {global_batch} does not split evenly over {world_size} workers")
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"ZeRO stage must be 0, 1, 2 or 3, got {zero_stage}")
    if offload_params and zero_stage != 3:
        raise ValueError("parameter offload needs ZeRO stage 3")
    if offload_optimizer and zero_stage == 0:
        raise ValueError("optimizer offload needs ZeRO stage 1, 2 or 3")
    if bucket_elements < 1:
        raise ValueError(f"bucket_elements must be positive, got {bucket_elements}")
    zero: dict = {"stage": zero_stage}
    if zero_stage >= 1:
        zero.update(reduce_bucket_size=bucket_elements, allgather_bucket_size=bucket_elements,
                    overlap_comm=overlap_comm)
    if zero_stage == 3:
        # DeepSpeed's memory-efficient linear replaces torch.nn.functional.linear for the whole process (and
        # leaves it replaced) with an autograd Function that has no forward-mode derivative: every Jacobian-vector
        # product through a Linear in the worker would fail, a frozen network's included (a method's tangent)
        zero["memory_efficient_linear"] = False
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if offload_params:
        zero["offload_param"] = {"device": "cpu"}
    config = {
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
    if offload_optimizer or offload_params:
        config["zero_force_ds_cpu_optimizer"] = False
    return config


def ds_cpu_adam_prebuilt() -> bool:
    """Whether DeepSpeed's CPU Adam op was compiled into this install (else using it would compile it now)."""
    try:
        from deepspeed.git_version_info import installed_ops
    except ImportError:
        return False
    return bool(installed_ops.get("cpu_adam"))


class MixedPrecisionForward(nn.Module):
    """Calls the DeepSpeed engine under autocast to its low-precision dtype; returns fp32 x_hat."""

    def __init__(self, engine: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.engine, self.dtype = engine, dtype

    def forward(self, z: Tensor, logsnr: Tensor, y: Tensor | None = None, w: Tensor | None = None) -> Tensor:
        """x_hat; ``w``: the guidance weights of a w-conditioned student."""
        with torch.autocast(z.device.type, dtype=self.dtype):
            out = self.engine(z, logsnr, y) if w is None else self.engine(z, logsnr, y, w)
            return out.float()


class DeepSpeedEngine:
    """The Engine interface (model, backward, step) over a deepspeed engine."""

    def __init__(self, engine, schedule: LrSchedule, base_lr: float, ema: EMA | None = None,
                 precision: Precision = "fp32", keeps_ema: bool | None = None, lr_factors: list[float] | None = None):
        self.engine, self.schedule, self.base_lr, self.ema = engine, schedule, base_lr, ema
        # each parameter group's multiple of the stage's learning rate, in the order the groups were given
        self.lr_factors = lr_factors or [1.0] * len(engine.optimizer.param_groups)
        # the EMA lives on rank 0 only (it saves and hands it on); every rank still joins its ZeRO-3 gather
        self.keeps_ema = ema is not None if keeps_ema is None else keeps_ema
        self.precision = precision
        # calling the engine runs the wrapped Denoiser's forward with ZeRO's hooks; another role's loss calls the
        # module itself (its parameters still gathered under ZeRO-3), so that this engine's backward hooks, which
        # belong to this role's own update, stay out of another role's backward
        low = DTYPES.get(precision)
        self.model = MixedPrecisionForward(engine, low) if low else engine
        self.network = MixedPrecisionForward(engine.module, low) if low else engine.module
        self.zero_stage = engine.zero_optimization_stage()
        self.updates = 0
        self.skipped_updates = 0
        self.set_lr()

    def set_lr(self) -> None:
        lr = self.base_lr * self.schedule(self.updates)
        for group, factor in zip(self.engine.optimizer.param_groups, self.lr_factors, strict=True):
            group["lr"] = lr * factor

    def backward(self, loss: Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> tuple[float, float]:
        lr = self.engine.optimizer.param_groups[0]["lr"]
        own_norm = None
        if self.zero_stage == 0 and self.precision == "fp32":
            # DeepSpeed then runs the torch optimizer as is: it keeps no norm and would apply a NaN
            # gradient; the gradients are all-reduced already, so this norm is the global one
            params = [p for p in self.engine.module.parameters() if p.requires_grad]
            own_norm = float(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))
        if own_norm is not None and not math.isfinite(own_norm):
            for p in params:
                p.grad = None  # a real skip: no optimizer step, Adam's moments untouched
        else:
            self.engine.step()  # clips to gradient_clipping and updates unless the gradients overflowed
        norm = own_norm if own_norm is not None else self.engine.get_global_grad_norm()
        if norm is None:
            raise RuntimeError(f"DeepSpeed reported no gradient norm (ZeRO stage {self.zero_stage}, {self.precision})")
        grad_norm = float(norm)
        if not math.isfinite(grad_norm):
            self.skipped_updates += 1
        elif self.keeps_ema:
            with self.gathered():
                if self.ema is not None:
                    self.ema.update(self.engine.module)
        self.updates += 1
        self.set_lr()
        return grad_norm, lr

    # -- state: DeepSpeed's own checkpoint (each rank its shard) plus the EMA, which rank 0 keeps --------------
    def save(self, directory: Path, client: dict) -> None:
        self.engine.save_checkpoint(str(directory), tag=TAG, client_state=client)
        if self.ema is not None and self.engine.global_rank == 0:
            save_file({k: v.contiguous() for k, v in self.ema.state_dict().items()},
                      str(Path(directory) / "ema.safetensors"))

    def load(self, directory: Path) -> dict:
        check_pickles(Path(directory) / TAG)
        try:
            _, client = self.engine.load_checkpoint(str(directory), tag=TAG, load_lr_scheduler_states=False)
        except pickle.UnpicklingError as err:  # a type the static check could not see: refused all the same
            raise CheckpointError(f"{directory}: raypd refuses to unpickle it: {str(err).splitlines()[0]}") from None
        if client is None:
            raise CheckpointError(f"{directory}: DeepSpeed could not load the checkpoint")
        if self.ema is not None:
            self.ema.load_state_dict(load_file(str(Path(directory) / "ema.safetensors")))
        return client

    def export_state(self) -> dict[str, Tensor]:
        """The EMA (rank 0; other ranks get nothing), or the fp32 master weights (collective under ZeRO-3: every
        rank calls it)."""
        if self.keeps_ema:
            return self.ema.state_dict() if self.ema is not None else {}
        return self.master_state_dict()

    def update_average(self, average: EMA) -> None:
        """Every rank averages the whole weights (gathered under ZeRO-3, a collective)."""
        with self.gathered():
            average.update(self.engine.module)

    def gathered(self):
        """Whole parameters on every rank for the duration (ZeRO-3 partitions them; a no-op otherwise)."""
        if self.zero_stage != 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(self.engine.module.parameters()), modifier_rank=None)

    def master_state_dict(self) -> dict[str, Tensor]:
        """The full fp32 weights, by name, on CPU; collective under ZeRO-3 (call it on every rank)."""
        from deepspeed.utils import safe_get_full_fp32_param

        state, masters = {}, self._stage0_masters()
        for name, p in self.engine.module.named_parameters():
            full = safe_get_full_fp32_param(p) if p.requires_grad else None
            if full is None and id(p) in masters:
                full = masters[id(p)]
            if full is None:
                if p.requires_grad and p.dtype != torch.float32:
                    raise RuntimeError(f"no fp32 master weights found for {name} (ZeRO stage {self.zero_stage}, "
                                       f"{self.precision})")
                full = self._gathered_copy(p)  # ZeRO-0 in fp32, frozen weights: the module's own are the master
            state[name] = full.float().cpu().contiguous()
        for name, b in self.engine.module.named_buffers():
            state[name] = b.detach().cpu().clone()
        return state

    def set_master(self, state: dict[str, Tensor]) -> None:
        """Write exact fp32 weights into the master copy (DeepSpeed derives it from the weights it has cast to
        bf16/fp16, so a student would otherwise start from a rounded teacher). Collective under ZeRO-3."""
        from deepspeed.utils import safe_set_full_fp32_param

        masters = self._stage0_masters(copy=False)
        with torch.no_grad():
            for name, p in self.engine.module.named_parameters():
                if not p.requires_grad or name not in state:
                    continue
                value = state[name].to(device=p.device if p.numel() else state[name].device, dtype=torch.float32)
                if hasattr(p, "ds_id") or hasattr(p, "_hp_mapping"):
                    safe_set_full_fp32_param(p, value)
                elif id(p) in masters:
                    masters[id(p)].copy_(value)

    def _stage0_masters(self, copy: bool = True) -> dict[int, Tensor]:
        """ZeRO-0 under bf16/fp16 wraps the optimizer in DeepSpeed's fp16 optimizers, which keep the fp32
        master copies in ``fp32_groups`` (one tensor per parameter, or one flat tensor per group)."""
        opt = self.engine.optimizer
        lows, highs = getattr(opt, "fp16_groups", None), getattr(opt, "fp32_groups", None)
        if highs is None:
            highs = getattr(opt, "fp32_groups_flat", None)
        if self.zero_stage != 0 or not lows or highs is None:
            return {}
        from torch._utils import _unflatten_dense_tensors

        masters = {}
        for low, high in zip(lows, highs):
            if isinstance(high, Tensor):
                high = _unflatten_dense_tensors(high, low)  # views into the flat buffer
            masters.update({id(p): h.detach().clone() if copy else h for p, h in zip(low, high)})
        return masters

    def _gathered_copy(self, p: nn.Parameter) -> Tensor:
        if self.zero_stage != 3:
            return p.detach().clone()
        import deepspeed

        with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
            return p.detach().clone()

    @property
    def module(self) -> Denoiser:
        return self.engine.module


def build_deepspeed_engine(model: Denoiser, *, lr: float, betas: tuple[float, float], schedule: LrSchedule,
                           config: dict, ema_decay: float | None = None,
                           embedding_lr_factor: float = 1.0) -> DeepSpeedEngine:
    """Initialise DeepSpeed around the student (parameter groups as ``raypd.train.engine.param_groups``).

    The optimizer is torch's Adam (no C++ op to build at start-up), except with ZeRO-Offload where
    DeepSpeed's CPU Adam is compiled into the install: then that one, which is much faster on CPU
    states.
    """
    import deepspeed

    params = param_groups(model, embedding_lr_factor)
    zero = config["zero_optimization"]
    offload = "offload_optimizer" in zero or "offload_param" in zero
    if offload and ds_cpu_adam_prebuilt():
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer = DeepSpeedCPUAdam(params, lr=lr, betas=betas, adamw_mode=False)
        config = {k: v for k, v in config.items() if k != "zero_force_ds_cpu_optimizer"}
    else:
        optimizer = torch.optim.Adam(params, lr=lr, betas=betas)
    # an EMA copy, and the exact fp32 weights, are taken before DeepSpeed partitions (ZeRO-3) or casts them
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    ema = EMA(model, ema_decay) if ema_decay is not None and rank == 0 else None
    low_precision = config["bf16"]["enabled"] or config["fp16"]["enabled"]
    exact = {n: p.detach().float().cpu().clone() for n, p in model.named_parameters()} if low_precision else None
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    if type(engine.checkpoint_engine) is not TorchCheckpointEngine:
        raise RuntimeError(f"DeepSpeed chose the checkpoint engine {type(engine.checkpoint_engine).__name__}; raypd "
                           "loads checkpoints through the torch one only")
    engine.checkpoint_engine = weights_only_engine(engine._config)
    want = zero["stage"]
    if engine.zero_optimization_stage() != want:
        raise RuntimeError(f"DeepSpeed runs ZeRO stage {engine.zero_optimization_stage()}, the config asked for {want}")
    precision: Precision = "bf16" if config["bf16"]["enabled"] else "fp16" if config["fp16"]["enabled"] else "fp32"
    wrapped = DeepSpeedEngine(engine, schedule, lr, ema, precision, keeps_ema=ema_decay is not None,
                              lr_factors=[g["lr_factor"] for g in params])
    if exact is not None:
        wrapped.set_master(exact)
    return wrapped


def init_single_process(port: int = 29511) -> None:
    """A one-rank gloo process group, for running DeepSpeed without Ray (tests, debugging)."""
    import deepspeed

    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                       ("MASTER_PORT", str(port))):
        os.environ.setdefault(key, value)
    deepspeed.init_distributed(dist_backend="gloo")


def stage_engine(cfg, world: int):
    """A builder of the DeepSpeed engine of a stage's role (``raypd.train.objective.Role``) on ``world`` ranks,
    with the run's ``dist`` settings; a role may train in a precision of its own."""
    d = cfg.dist

    def build(role, batch_size: int) -> DeepSpeedEngine:
        config = ds_config(global_batch=batch_size, world_size=world, zero_stage=d.zero_stage,
                           precision=role.precision or d.precision, grad_clip=role.grad_clip,
                           offload_optimizer=d.offload_optimizer, offload_params=d.offload_params,
                           bucket_elements=d.bucket_elements, overlap_comm=d.overlap_comm)
        return build_deepspeed_engine(role.model, lr=role.lr, betas=role.betas, schedule=role.schedule,
                                      config=config, ema_decay=role.ema_decay,
                                      embedding_lr_factor=role.embedding_lr_factor)

    return build
