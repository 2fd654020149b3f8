"""Loader throughput from local shards against the rate a training step consumes images.

Writes 32x32 RGB shards (CIFAR-10 from an .npz when given, else generated images), then measures
decoded images per second through raypd's ShardLoader with 0, 1 and 2 loader workers, and, in the
same run, the images per second one distillation train_step consumes at the same batch size (a
small UNet, as in tools/bench_step.py). Goal: the loader delivers >= 5x what the step consumes.

    python tools/bench_data.py [--npz cifar10.npz] [--batch 32] [--images 4096]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from raypd.config import load_config
from raypd.data import Batch
from raypd.data.shards import ShardLoader, expand_urls
from raypd.data.sources import open_source
from raypd.data.writer import write_shards
from raypd.diffusion import logsnr_schedule
from raypd.models import build_denoiser
from raypd.methods.progressive import HalvingRound
from raypd.methods.regression import bare
from raypd.train import build_plain_engine, freeze, linear_decay, make_student, train_step


def make_npz(path: Path, n: int, npz: str | None) -> Path:
    if npz:
        with np.load(npz, allow_pickle=False) as data:
            x, y = data["x"][:n], data["y"][:n]
    else:  # smooth random images: they compress like photos, unlike pure noise
        g = np.random.default_rng(0)
        low = g.integers(0, 256, size=(n, 8, 8, 3), dtype=np.uint8)
        x = np.repeat(np.repeat(low, 4, axis=1), 4, axis=2)
        y = g.integers(0, 10, size=n)
    np.savez(path, x=x, y=y)
    return path


def loader_rate(urls: list[str], batch: int, workers: int, images: int) -> float:
    loader = ShardLoader(urls, batch_size=batch, channels=3, num_classes=10, num_workers=workers,
                         random_flip=True, resampled=True)
    it = iter(loader)
    next(it)  # worker start-up is paid once per run, not per image
    start, seen = time.perf_counter(), 0
    while seen < images:
        seen += next(it).x.shape[0]
    return seen / (time.perf_counter() - start)


def step_rate(batch: int, iters: int = 8) -> float:
    cfg = load_config(None, ["data.resolution=32", "data.channels=3", "model.ch=32", "model.ch_mult=[1,2,2]",
                             "model.attn_resolutions=[16]"])
    torch.manual_seed(0)
    teacher = freeze(build_denoiser(cfg.model, cfg.data))
    engine = build_plain_engine(make_student(teacher), lr=1e-4, betas=(0.9, 0.999), grad_clip=1.0,
                                schedule=linear_decay(10**9))
    x = torch.rand(batch, 3, 32, 32) * 2 - 1
    objective = bare(HalvingRound, student_steps=8, logsnr_fn=logsnr_schedule)
    nets = {"student": engine.model, "teacher": teacher}
    train_step(engine, objective.loss("student", nets, Batch(x), None, 1))
    start = time.perf_counter()
    for _ in range(iters):
        train_step(engine, objective.loss("student", nets, Batch(x), None, 1))
    return batch * iters / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--npz", help="an .npz with x (N,32,32,3) uint8 and y, e.g. CIFAR-10")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--images", type=int, default=4096)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src = make_npz(Path(tmp) / "data.npz", args.images, args.npz)
        write_shards(open_source("npz", str(src)), Path(tmp) / "shards", shard_size=256, progress=False)
        urls = expand_urls(str(Path(tmp) / "shards"))
        consume = step_rate(args.batch)
        print(f"train_step consumes {consume:,.0f} images/s (batch {args.batch}, 32x32, small UNet, CPU)")
        for workers in (0, 1, 2):
            rate = loader_rate(urls, args.batch, workers, args.images)
            print(f"loader, {workers} workers: {rate:,.0f} images/s decoded "
                  f"({rate / max(workers, 1):,.0f} per worker), {rate / consume:.1f}x the step's consumption")


if __name__ == "__main__":
    main()
