"""``raypd sample``: a sample grid of any checkpoint at any step count (``raypd fid`` scores one).

    raypd sample --checkpoint runs/local/round-04-1steps --steps 1 --n 64 --out grid.png
"""

from __future__ import annotations

import argparse
import sys

import torch


def checkpoint_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="a raypd checkpoint directory")
    sampling_args(parser)


def sampling_args(parser: argparse.ArgumentParser, *, many_steps: bool = False) -> None:
    """How a checkpoint is sampled: steps (``many_steps``: a list of step counts), noise seed, batch, device and
    guidance weight."""
    if many_steps:
        parser.add_argument("--steps", type=int, nargs="+",
                            help="DDIM step counts to score each checkpoint at (default: each checkpoint's own)")
    else:
        parser.add_argument("--steps", type=int, help="DDIM steps (default: the checkpoint's own)")
    parser.add_argument("--seed", type=int, help="noise seed (default: the run's eval.seed, so its samples are the run's)")
    parser.add_argument("--batch", type=int, default=256,
                        help="samples per forward pass (raypd fid samples 256 at a time and holds about 8 x this)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--guidance", type=float,
                        help="classifier-free guidance weight w (a guided teacher, or a guided distillation's "
                             "w-conditioned student, which needs one)")


def guidance_of(args: argparse.Namespace, model) -> float | None:
    """``--guidance``, checked against what the checkpoint can do, before anything is sampled."""
    w = args.guidance
    if w is None:
        if model.guidance_input:
            raise ValueError("this student takes a classifier-free guidance weight as an input: pass --guidance W")
        return None
    if w < 0:
        raise ValueError(f"--guidance must be >= 0, got {w}")
    if not model.guidance_input and model.null_class is None:
        raise ValueError("--guidance needs a guided network: a teacher trained with model.class_dropout > 0, or "
                         "a guided distillation's student")
    return w


def noise_seed(args: argparse.Namespace, meta) -> int:
    """``--seed``, else the seed the checkpoint's run evaluated with."""
    return args.seed if args.seed is not None else int(meta.config.get("eval", {}).get("seed", 1234))


def generate(args: argparse.Namespace, n: int):
    """(samples [-1, 1], checkpoint metadata), with a progress bar over batches."""
    from tqdm import tqdm

    from raypd.checkpoint import load_checkpoint
    from raypd.eval.samples import fixed_noise, sample_ddim

    model, meta = load_checkpoint(args.checkpoint, map_location=args.device)
    w = guidance_of(args, model)
    steps = args.steps or meta.sampling_steps
    z, y = fixed_noise(n, meta.data.channels, meta.data.resolution, seed=noise_seed(args, meta),
                       num_classes=meta.data.num_classes)
    logsnr_fn = meta.logsnr_fn()
    out = []
    for start in tqdm(range(0, n, args.batch), desc=f"sampling {steps} steps", unit="batch", file=sys.stderr):
        yb = None if y is None else y[start:start + args.batch]
        out.append(sample_ddim(model, z[start:start + args.batch], yb, steps, logsnr_fn=logsnr_fn, device=args.device,
                               w=w))
    return torch.cat(out), meta, steps


def sample_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="raypd sample", description="A sample grid from a checkpoint.")
    checkpoint_args(parser)
    parser.add_argument("--n", type=int, default=64, help="number of samples")
    parser.add_argument("--out", default="samples.png", help="grid PNG to write")
    args = parser.parse_args(argv)
    from raypd.checkpoint import CheckpointError
    from raypd.eval.samples import save_grid

    try:
        samples, meta, steps = generate(args, args.n)
    except (CheckpointError, ValueError) as err:
        print(f"checkpoint error: {err}" if isinstance(err, CheckpointError) else f"error: {err}", file=sys.stderr)
        return 2
    guided = "" if args.guidance is None else f", w={args.guidance:g}"
    save_grid(samples, args.out, title=f"{meta.kind}, {steps} steps{guided}")
    print(args.out)
    return 0
