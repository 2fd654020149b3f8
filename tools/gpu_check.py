"""A GPU rehearsal: a short bf16 ZeRO-2 distillation round of the paper's networks, against a bare bf16 floor.

For the CIFAR-10 UNet (micro-batch 16, as ``configs/cifar10.yaml`` on 8 GPUs) and the ImageNet 64 UNet
(micro-batch 64, as ``configs/imagenet64.yaml`` on 32 GPUs), on one GPU: raypd's distillation update
(DeepSpeed ZeRO-2 in bf16, the teacher in bf16) and the floor (the same update written inline: two
teacher forwards and a student forward/backward under bf16 autocast, fused Adam), interleaved. Prints
images/s, peak memory, the scaled-dot-product-attention kernel PyTorch picked, and raypd / floor.
Compare the peak memory with ``--dry-run``'s estimate.

    python tools/gpu_check.py                      # on a GPU node (one process, NCCL)
    python tools/gpu_check.py --tiny --device cpu  # a small smoke run of the same code on CPU (gloo)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CASES = [("CIFAR-10 UNet", ROOT / "configs" / "cifar10.yaml", 16), ("ImageNet 64 UNet", ROOT / "configs" / "imagenet64.yaml", 64)]
TINY = [("tiny UNet", None, 4)]


def sdpa_backend(model, z, logsnr, y) -> str:
    """The attention kernel(s) one forward dispatches to, from the profiler's op names."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), torch.autocast(z.device.type, dtype=torch.bfloat16), profile(activities=[ProfilerActivity.CPU]) as prof:
        model(z, logsnr, y)
    names = {e.key for e in prof.key_averages() if "scaled_dot_product" in e.key and e.key != "aten::scaled_dot_product_attention"}
    kinds = sorted({n.split("_scaled_dot_product_")[-1] for n in names if "_scaled_dot_product_" in n} or {"math"})
    return "+".join(kinds)


def run_case(label: str, config: Path | None, micro: int, device: torch.device, updates: int, warmup: int) -> None:
    from raypd.config import load_config
    from raypd.data import Batch
    from raypd.diffusion import make_logsnr_fn
    from raypd.distributed.deepspeed import build_deepspeed_engine, ds_config
    from raypd.models import build_denoiser
    from raypd.methods.progressive import HalvingRound
    from raypd.methods.regression import regression_loss
    from raypd.train import freeze, linear_decay, make_student, train_step

    overrides = ["dist.precision=bf16", "dist.zero_stage=2"] if config else \
        ["data.resolution=16", "data.num_classes=10", "dist.workers=1", "dist.precision=bf16", "dist.zero_stage=2"]
    cfg = load_config(config, overrides)
    d = cfg.data
    logsnr_fn = make_logsnr_fn(cfg.diffusion.schedule, logsnr_min=cfg.diffusion.logsnr_min,
                               logsnr_max=cfg.diffusion.logsnr_max, betas=cfg.diffusion.discrete_betas)
    torch.manual_seed(0)
    teacher = freeze(build_denoiser(cfg.model, d).to(device))
    student = make_student(teacher)
    config_ds = ds_config(global_batch=micro, world_size=1, zero_stage=2, precision="bf16", grad_clip=1.0)
    engine = build_deepspeed_engine(student, lr=1e-5, betas=(0.9, 0.99), schedule=linear_decay(10**9), config=config_ds)
    floor_student = make_student(teacher)
    fused = {"fused": True} if device.type == "cuda" else {}
    floor_opt = torch.optim.Adam(floor_student.parameters(), lr=1e-5, **fused)
    x = torch.rand(micro, d.channels, d.resolution, d.resolution, device=device) * 2 - 1
    y = torch.randint(0, d.num_classes, (micro,), device=device) if d.num_classes else None
    gen = torch.Generator(device).manual_seed(0)
    n = 8

    def raypd_step():
        train_step(engine, regression_loss(HalvingRound, {"student": engine.model, "teacher": teacher}, Batch(x, y),
                                           student_steps=n, weighting=cfg.diffusion.weighting, logsnr_fn=logsnr_fn,
                                           generator=gen, teacher_dtype=torch.bfloat16))

    def floor_step():
        t = (torch.randint(0, n, (micro,), generator=gen, device=device) + 1).float() / n
        lam, lam_mid, lam_end = (logsnr_fn(t - k / n).view(-1, 1, 1, 1) for k in (0.0, 0.5, 1.0))
        (a, s), (a_mid, s_mid), (a_end, s_end) = ((v.sigmoid().sqrt(), (-v).sigmoid().sqrt()) for v in (lam, lam_mid, lam_end))
        z = a * x + s * torch.randn(x.shape, generator=gen, device=device)
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
            x1 = teacher(z, lam.flatten(), y).float()
            z_mid = a_mid * x1 + s_mid * (z - a * x1) / s
            x2 = teacher(z_mid, lam_mid.flatten(), y).float()
        z_end = a_end * x2 + s_end * (z_mid - a_mid * x2) / s_mid
        target = (z_end - s_end / s * z) / (a_end - s_end / s * a)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = (floor_student(z, lam.flatten(), y).float() - target).square().mean()
        loss.backward()
        floor_opt.step()
        floor_opt.zero_grad(set_to_none=True)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    times = {"floor": [], "raypd": []}
    peaks = {}
    for name, fn in (("floor", floor_step), ("raypd", raypd_step)):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for _ in range(warmup):
            fn()
        sync()
        peaks[name] = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    for _ in range(updates):  # interleaved, so drift hits both alike
        for name, fn in (("floor", floor_step), ("raypd", raypd_step)):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    floor, ours = statistics.median(times["floor"]), statistics.median(times["raypd"])
    backend = sdpa_backend(engine.model, x, torch.zeros(micro, device=device), y)
    params = sum(p.numel() for p in teacher.parameters())
    print(f"{label}: {params / 1e6:.1f}M params, micro-batch {micro} at {d.resolution}px, {updates} timed updates")
    print(f"  raypd (ZeRO-2 bf16): {micro / ours:8.1f} images/s, peak {peaks['raypd']:.2f} GiB")
    print(f"  floor (bare bf16):   {micro / floor:8.1f} images/s, peak {peaks['floor']:.2f} GiB")
    print(f"  ratio raypd / floor (time per update): {ours / floor:.3f}; attention kernel: {backend}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--updates", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="a small model instead of the paper's (a smoke run)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU here: nothing to check (--tiny --device cpu runs the same code on CPU)", file=sys.stderr)
        return 2
    if device.type == "cpu" and not args.tiny:
        print("the paper's networks on CPU would take hours: pass --tiny for a smoke run", file=sys.stderr)
        return 2
    import deepspeed

    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                       ("MASTER_PORT", "29517")):
        os.environ.setdefault(key, value)
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
              f"deepspeed {deepspeed.__version__}")
    for label, config, micro in (TINY if args.tiny else CASES):
        run_case(label, config, micro, device, args.updates, args.warmup)
    return 0


if __name__ == "__main__":
    sys.exit(main())
