"""Updates per second of a round run through the training loop against the bare-PyTorch floor.

Same model, batch and threads in one run: the floor is tools/bench_step.py's bare distillation
step in this process with as many threads as one Ray worker gets (1 by default), under bf16
autocast when the round runs in bf16. The round runs through the production loop: in this process
on the plain-PyTorch engine (``--workers 0``, local mode) and as a real Ray Train run of DeepSpeed
workers (1, then 2) for every ZeRO stage and precision asked for; its speed is the loop's own
report over the second half of the round (after start-up), and the wall time includes start-up.
Goal: 1 worker within 1.10x of the floor.

    python tools/bench_overhead.py [--batch 32] [--updates 60] [--resolution 16] [--loader-workers 1]
                                   [--precision fp32 bf16] [--zero-stage 0 1 2 3] [--workers 0 1 2]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_step import floor_step  # noqa: E402

from raypd.checkpoint import meta_for, save_checkpoint  # noqa: E402
from raypd.config import load_config  # noqa: E402
from raypd.data.prepare import training_shards  # noqa: E402
from raypd.distributed.trainer import ensure_ray, run_stage  # noqa: E402
from raypd.models import build_denoiser  # noqa: E402
from raypd.methods import method_for, objective_for  # noqa: E402
from raypd.train import freeze, make_student  # noqa: E402
from raypd.train.runner import InProcessRunner  # noqa: E402
from raypd.train.stage import round_stage  # noqa: E402


def floor_rate(cfg, teacher, batch: int, precision: str, iters: int = 15) -> float:
    student = make_student(teacher)
    opt = torch.optim.Adam(student.parameters(), lr=1e-4)
    x = torch.rand(batch, cfg.data.channels, cfg.data.resolution, cfg.data.resolution) * 2 - 1
    gen = torch.Generator().manual_seed(0)
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext())
    with autocast:
        for _ in range(3):
            floor_step(student, teacher, opt, x, 8, gen)
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            floor_step(student, teacher, opt, x, 8, gen)
            times.append(time.perf_counter() - start)
    return 1.0 / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--updates", type=int, default=60)
    parser.add_argument("--resolution", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="threads per worker (Ray's default is 1)")
    parser.add_argument("--loader-workers", type=int, default=1,
                        help="decoding processes per worker (0 decodes on the training thread, which the floor never does)")
    parser.add_argument("--precision", nargs="+", default=["fp32"], choices=["fp32", "bf16"])
    parser.add_argument("--zero-stage", nargs="+", type=int, default=[2], choices=[0, 1, 2, 3])
    parser.add_argument("--workers", nargs="+", type=int, default=[0, 1, 2],
                        help="0: in this process on the plain-PyTorch engine (local mode)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = [f"data.resolution={args.resolution}", f"distill.batch_size={args.batch}", f"data.loader_workers={args.loader_workers}",
                f"run.storage_path={root}", f"dist.checkpoint_every={args.updates // 2}"]
        cfg = load_config(None, base)
        torch.manual_seed(0)
        teacher = freeze(build_denoiser(cfg.model, cfg.data))
        save_checkpoint(root / "teacher", teacher, meta_for(cfg, kind="teacher", sampling_steps=16, round=None))
        torch.set_num_threads(args.threads)
        shards = training_shards(cfg.data, root / "data", readers=max(args.workers) * max(1, args.loader_workers))
        rows = []
        for precision in args.precision:
            floor = floor_rate(cfg, teacher, args.batch, precision)
            print(f"floor (bare PyTorch, {precision}, {args.threads} thread(s)): {floor:.2f} updates/s at batch "
                  f"{args.batch}", flush=True)
            for stage in args.zero_stage:
                for workers in args.workers:
                    if workers == 0 and (stage != args.zero_stage[0] or precision != "fp32"):
                        continue  # local mode has no ZeRO stage and trains in fp32
                    wcfg = load_config(None, base + [f"dist.workers={workers}", f"dist.zero_stage={stage}",
                                                     f"dist.precision={precision}", "dist.teacher_dtype=" +
                                                     ("bf16" if precision == "bf16" else "fp32")])
                    rnd = method_for(wcfg).plan()[0]
                    name = f"bench-z{stage}-{precision}-{workers}w"
                    spec = round_stage(rnd, root / "teacher", shards).with_(name=name, updates=args.updates, student_steps=8,
                                                                       sampling_steps=8)
                    began = time.perf_counter()
                    if workers == 0:
                        torch.set_num_threads(args.threads)
                        InProcessRunner(wcfg, root / "local", torch.device("cpu"),
                                        objectives=lambda stage, c=wcfg: objective_for(c, stage)).run(spec, root / name)
                        last = sorted((root / "local" / name).glob("checkpoint_*"))[-1]
                        metrics = json.loads((last / "metrics.json").read_text())
                        what = "in-process loop, plain PyTorch"
                    else:
                        ensure_ray(wcfg)
                        metrics = run_stage(wcfg, spec, storage=root / "ray", output=root / name)
                        what = f"Ray Train + DeepSpeed ZeRO-{stage} {precision}, {workers} worker(s)"
                    rate = metrics["samples_per_s"] / args.batch
                    rows.append((precision, stage if workers else "-", workers, rate, floor / rate,
                                 time.perf_counter() - began))
                    print(f"{what}: {rate:.2f} updates/s (global batch {args.batch}); floor / raypd = "
                          f"{floor / rate:.2f}x", flush=True)
        print("\nprecision | ZeRO | workers | updates/s | floor/raypd | wall s")
        for precision, stage, workers, rate, ratio, wall in rows:
            print(f"{precision} | {stage} | {workers} | {rate:.2f} | {ratio:.2f}x | {wall:.0f}")

if __name__ == "__main__":
    main()
