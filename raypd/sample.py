"""``raypd sample`` and ``raypd fid``: look at and score any checkpoint at any step count.

    raypd sample --checkpoint runs/local/round-04-1steps --steps 1 --n 64 --out grid.png
    raypd fid --checkpoint runs/local/round-04-1steps --steps 1 --n 10000 [--extractor inception]

``fid`` scores against the training data the checkpoint's run used (its config is in the
checkpoint), with the same cached reference statistics and extractor as the run's own report.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="a raypd checkpoint directory")
    parser.add_argument("--steps", type=int, help="DDIM steps (default: the checkpoint's own)")
    parser.add_argument("--seed", type=int, default=1234, help="noise seed")
    parser.add_argument("--batch", type=int, default=256, help="samples per forward pass")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def _generate(args: argparse.Namespace, n: int):
    """(samples [-1, 1], checkpoint metadata), with a progress bar over batches."""
    from tqdm import tqdm

    from raypd.checkpoint import load_checkpoint
    from raypd.eval.samples import fixed_noise, sample_ddim

    model, meta = load_checkpoint(args.checkpoint, map_location=args.device)
    steps = args.steps or meta.sampling_steps
    z, y = fixed_noise(n, meta.data.channels, meta.data.resolution, seed=args.seed, num_classes=meta.data.num_classes)
    logsnr_fn = meta.logsnr_fn()
    out = []
    for start in tqdm(range(0, n, args.batch), desc=f"sampling {steps} steps", unit="batch", file=sys.stderr):
        yb = None if y is None else y[start:start + args.batch]
        out.append(sample_ddim(model, z[start:start + args.batch], yb, steps, logsnr_fn=logsnr_fn, device=args.device))
    return torch.cat(out), meta, steps


def sample_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="raypd sample", description="A sample grid from a checkpoint.")
    _common(parser)
    parser.add_argument("--n", type=int, default=64, help="number of samples")
    parser.add_argument("--out", default="samples.png", help="grid PNG to write")
    args = parser.parse_args(argv)
    from raypd.checkpoint import CheckpointError
    from raypd.eval.samples import save_grid

    try:
        samples, meta, steps = _generate(args, args.n)
    except CheckpointError as err:
        print(f"checkpoint error: {err}", file=sys.stderr)
        return 2
    save_grid(samples, args.out, title=f"{meta.kind}, {steps} steps")
    print(args.out)
    return 0


def fid_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="raypd fid", description="FID/KID of a checkpoint's samples.")
    _common(parser)
    parser.add_argument("--n", type=int, default=10000, help="number of samples")
    parser.add_argument("--extractor", choices=("classifier", "inception"), help="default: the run's")
    parser.add_argument("--inception-weights", help="Inception weights in torch-fidelity's format (offline)")
    parser.add_argument("--reference-samples", type=int, help="training images behind the reference statistics")
    args = parser.parse_args(argv)
    from raypd.checkpoint import CheckpointError, read_meta
    from raypd.config import config_from_dict
    from raypd.data.prepare import training_shards
    from raypd.data.shards import DataError, check_shards
    from raypd.eval.setup import fid_setup

    try:
        meta = read_meta(args.checkpoint)
        overrides = [f"eval.extractor={args.extractor}"] if args.extractor else []
        overrides += [f"eval.inception_weights={args.inception_weights}"] if args.inception_weights else []
        overrides += [f"eval.reference_samples={args.reference_samples}"] if args.reference_samples else []
        cfg = config_from_dict(meta.config, overrides)
        run = Path(args.checkpoint).resolve().parent
        d = cfg.data
        urls = training_shards(d, run / "data", seed=cfg.run.seed)
        manifest = check_shards(urls, resolution=d.resolution, channels=d.channels, num_classes=d.num_classes,
                                world_size=1, num_workers=0)
        spec = fid_setup(cfg, urls, manifest, run)
        samples, meta, steps = _generate(args, args.n)
    except (CheckpointError, DataError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    result = spec.score(samples)
    print(json.dumps({"checkpoint": str(args.checkpoint), "steps": steps, "seed": args.seed, **result}))
    return 0
