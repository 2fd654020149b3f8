"""``raypd fid``: FID/KID of any checkpoint's samples at any step count.

    raypd fid --checkpoint runs/local/round-04-1steps --steps 1 --n 10000 [--extractor inception]

It scores against the training data the checkpoint's run used (its config is in the checkpoint),
through the run's FID set-up: the same extractor and cached reference statistics as its report.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from raypd.sample import checkpoint_args, guidance_of, noise_seed


def sample_features(args: argparse.Namespace, spec) -> tuple[dict, int, str]:
    """The features of ``args.n`` samples, sampled and extracted a chunk at a time (memory bounded by
    ``args.batch`` x 8 images, not by ``args.n``), with a progress bar."""
    import torch
    from tqdm import tqdm

    from raypd.checkpoint import load_checkpoint
    from raypd.eval.chunks import chunks_for, collect, run_here, sampling_name
    from raypd.eval.samples import NOISE_BLOCK

    model, meta = load_checkpoint(args.checkpoint, map_location=args.device)
    w = guidance_of(args, model)
    steps = args.steps or meta.sampling_steps
    d = meta.data
    size = max(NOISE_BLOCK, -(-8 * args.batch // NOISE_BLOCK) * NOISE_BLOCK)
    precision = meta.config.get("eval", {}).get("precision", "auto")  # the run's, so its numbers come out again
    chunks = chunks_for(args.n, "ddim", steps, data=d, seed=spec.seed, precision=precision, extractor=spec.extractor,
                        kid=spec.kid, prc=spec.prc, chunk_size=size, guidance=w)
    bar = tqdm(total=args.n, desc=f"sampling {steps} steps", unit="img", file=sys.stderr)
    point = collect(run_here(model, chunks, logsnr_fn=meta.logsnr_fn(), device=torch.device(args.device)), n=args.n,
                    shape=(d.channels, d.resolution, d.resolution), grid_size=0, full=None,
                    progress=lambda done, n: bar.update(done - bar.n))
    bar.close()
    return point.features, steps, sampling_name(precision, gpu=False, device=torch.device(args.device))


def fid_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="raypd fid", description="FID/KID of a checkpoint's samples.")
    checkpoint_args(parser)
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
        spec = dataclasses.replace(fid_setup(cfg, urls, manifest, run), seed=noise_seed(args, meta), num_samples=args.n)
        features, steps, sampling = sample_features(args, spec)
    except (CheckpointError, DataError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from raypd.eval.chunks import LABEL_HITS

    result = spec.score(features=features, sampling=sampling)
    extra = {} if args.guidance is None else {"guidance": args.guidance}
    if LABEL_HITS in features:
        extra["label_accuracy"] = float(features[LABEL_HITS].mean())
    print(json.dumps({"checkpoint": str(args.checkpoint), "steps": steps, **extra, **result}))
    return 0
