"""GPU memory per training rank, estimated before anything runs (``--dry-run`` prints it).

The model's parts follow from the parameter count, the ZeRO stage, the precision and the offload
settings (what DeepSpeed keeps on each GPU); the activations are measured, not guessed: one
forward of the network at the micro-batch runs on PyTorch's meta device (no memory, no compute)
with a hook that adds up every tensor autograd keeps for the backward pass. Attention is counted
as a fused kernel keeps it (q, k, v, the output and a logsumexp per query), since raypd's
attention reaches PyTorch's fused SDPA kernels on GPUs. With ``dist.gradient_checkpointing`` the
same measurement counts what checkpointing keeps (each block's inputs); the recompute of one block at
a time during backward is not counted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from raypd.config import Config
from raypd.models import build_denoiser

GIB = 2**30
GPU_MEMORY_GIB = {"A100": 40, "A100-40G": 40, "A100-80G": 80, "H100": 80, "H200": 141, "B200": 180, "L4": 24,
                  "A10G": 24, "L40S": 48, "V100": 16, "T4": 16}
"""Memory of Ray's accelerator types (``dist.accelerator_type``); "A100" is taken as the 40 GB part."""
DEFAULT_GPU = "A100-40G"
"""The GPU assumed when ``dist.accelerator_type`` is empty: the 40 GB A100 of the cluster files' 8-GPU nodes."""
OVERLAP_FACTOR = 4.5
"""Bucket memory multiplier with ``overlap_comm`` (DeepSpeed's documentation of ZeRO-2)."""
OVERHEAD_GIB = 1.5
"""CUDA context, cuBLAS/cuDNN workspaces and allocator slack per process (an assumption)."""


@dataclass(frozen=True)
class StageMemory:
    stage: str
    micro_batch: int
    parts: dict[str, float]
    """GiB per GPU of each part."""

    @property
    def total(self) -> float:
        return sum(self.parts.values())


def _keeping_inputs(recompute, keep):
    def run(block, *args):
        for arg in args:
            if isinstance(arg, torch.Tensor):
                keep(arg)
        return recompute(block, *args)

    return run


def activation_gib(cfg: Config, micro_batch: int) -> float:
    """GiB autograd keeps for the backward of one training forward at ``micro_batch`` (measured on meta)."""
    d = cfg.data
    dtype = torch.float32 if cfg.dist.precision == "fp32" else torch.bfloat16
    kept: dict[int, tuple[torch.Tensor, int]] = {}  # holding the (meta) tensors keeps their ids unique
    fused = [0]
    sdpa = F.scaled_dot_product_attention

    def fused_attention(q, k, v, *args, **kwargs):  # what a flash / memory-efficient kernel saves
        fused[0] += sum(t.numel() * t.element_size() for t in (q, k, v, q)) + q.shape[0] * q.shape[1] * q.shape[2] * 4
        return torch.empty_like(q)

    weights: set[int] = set()

    def keep(tensor):
        if id(tensor) not in weights and id(tensor._base) not in weights:  # layers keep weights (or views): counted apart
            kept[id(tensor)] = (tensor, tensor.numel() * tensor.element_size())
        return tensor

    with torch.device("meta"):
        model = build_denoiser(cfg.model, d).to(dtype).train()
        if cfg.dist.gradient_checkpointing:
            model.enable_gradient_checkpointing()
            for module in model.modules():  # a checkpointed block keeps its inputs, outside autograd's hooks
                recompute = getattr(module, "_gradient_checkpointing_func", None)
                if recompute is not None:
                    module._gradient_checkpointing_func = _keeping_inputs(recompute, keep)
        weights.update(id(p) for p in model.parameters())
        z = torch.zeros(micro_batch, d.channels, d.resolution, d.resolution, dtype=dtype)
        y = torch.zeros(micro_batch, dtype=torch.long) if d.num_classes else None
        F.scaled_dot_product_attention = fused_attention
        try:
            with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
                model(z, torch.zeros(micro_batch, dtype=dtype), y)
        finally:
            F.scaled_dot_product_attention = sdpa
    return (sum(size for _, size in kept.values()) + fused[0]) / GIB


def stage_memory(cfg: Config, params: int, *, distills: bool) -> StageMemory:
    """Per-GPU memory of a teacher-training stage (``distills`` False) or a round, in GiB."""
    d = cfg.dist
    world = max(1, d.workers)
    batch = cfg.distill.batch_size if distills else cfg.teacher.batch_size
    micro = batch // world
    low = d.precision != "fp32"
    width = 2 if low else 4
    shard = {k: world if d.zero_stage >= k else 1 for k in (1, 2, 3)}
    p = params / GIB
    parts = {
        "weights": 0.0 if d.offload_params else width * p / shard[3],
        "gradients": width * p / shard[2] + (4 * p / shard[1] if low else 0.0),  # bf16 grads + fp32 partition
        "optimizer": 0.0 if d.offload_optimizer else (8 * p + (4 * p if low else 0.0)) / shard[1],  # Adam (+ master)
    }
    if distills:
        teacher_width = 4 if d.teacher_dtype == "fp32" or (d.teacher_dtype == "auto" and not d.use_gpu) else 2
        parts["teacher"] = teacher_width * p
    else:
        parts["EMA"] = 4 * p
    parts["activations"] = activation_gib(cfg, micro)
    if d.zero_stage >= 1:  # reduce + all-gather buckets; overlapping keeps about 4.5 times them (DeepSpeed's docs)
        parts["ZeRO buckets"] = 2 * d.bucket_elements * width * (OVERLAP_FACTOR if d.overlap_comm else 1) / GIB
    parts["CUDA overhead"] = OVERHEAD_GIB
    return StageMemory("round" if distills else "teacher", micro, parts)


def gpu_memory(cfg: Config) -> tuple[str, float]:
    """(name, GiB) of the GPU the run is planned on."""
    name = cfg.dist.accelerator_type or DEFAULT_GPU
    return name, float(GPU_MEMORY_GIB.get(name, GPU_MEMORY_GIB[DEFAULT_GPU]))


def describe_memory(cfg: Config, params: int, *, trains_teacher: bool) -> tuple[list[str], list[str]]:
    """(lines, warnings) of the per-GPU memory estimate of each kind of stage the run has."""
    name, capacity = gpu_memory(cfg)
    stages = ([stage_memory(cfg, params, distills=False)] if trains_teacher else []) + \
        [stage_memory(cfg, params, distills=True)]
    known = "" if cfg.dist.accelerator_type in GPU_MEMORY_GIB else \
        f" (dist.accelerator_type {'unset' if not cfg.dist.accelerator_type else 'unknown'}: assumed)"
    lines = [f"GPU memory per rank, estimated (against {name}, {capacity:.0f} GiB{known}):"]
    warnings = []
    for s in stages:
        parts = ", ".join(f"{k} {v:.2f}" for k, v in s.parts.items())
        lines.append(f"  {s.stage}: {s.total:.1f} GiB at micro-batch {s.micro_batch} ({parts})")
        if s.total > capacity:
            warnings.append(f"memory: a {s.stage} stage needs about {s.total:.1f} GiB per GPU, more than the "
                            f"{capacity:.0f} GiB of {name}: set dist.gradient_checkpointing=true, raise dist.workers "
                            "or dist.zero_stage, or plan on a larger GPU (dist.accelerator_type)")
    return lines, warnings


