"""``raypd fid``: FID/KID of checkpoints' samples at any step counts, in one command.

    raypd fid --checkpoint runs/local/round-04-1steps --steps 1 --n 10000 [--extractor inception]
    raypd fid --run runs/cifar10 --steps 1 2 4 --n 50000 --workers 8 --use-gpu --table fid.md

Each checkpoint is scored against the training data its run used (its config is in the checkpoint),
through the run's FID set-up: the same extractor and cached reference statistics as its report. ``--run``
scores every checkpoint of a run that is finished so far (the teacher and each round's student), so it can
be called while the run goes on. ``--workers N`` samples and extracts features on N Ray tasks (one GPU each
with ``--use-gpu``; the cluster of ``RAY_ADDRESS``, or a local one), the chunk path the run's own
evaluation takes; without it, everything runs in this process. Every point prints one JSON line;
``--table`` writes them all as one Markdown table, with a JSON record beside it from which a later call
takes the points it has already scored (a checkpoint is known by its weights' digest).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path

from raypd.sample import guidance_of, noise_seed, sampling_args


def _args() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raypd fid", description="FID/KID of checkpoints' samples.")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", nargs="+", help="raypd checkpoint directories")
    which.add_argument("--run", help="a run directory: every checkpoint finished in it so far (teacher and rounds)")
    sampling_args(parser, many_steps=True)
    parser.add_argument("--n", type=int, default=10000, help="number of samples per point")
    parser.add_argument("--extractor", choices=("classifier", "inception"), help="default: the run's")
    parser.add_argument("--inception-weights", help="Inception weights in torch-fidelity's format (offline)")
    parser.add_argument("--reference-samples", type=int, help="training images behind the reference statistics")
    parser.add_argument("--workers", type=int, default=0,
                        help="Ray tasks to spread the sampling over (0: this process)")
    parser.add_argument("--use-gpu", action="store_true", help="one GPU per Ray task")
    parser.add_argument("--table", help="Markdown table of every point (a JSON record of them is kept beside it)")
    return parser


def finished_checkpoints(run: Path) -> list[Path]:
    """The run's checkpoints finished so far, in the order the run makes them: the teacher, then the rounds (a
    stage still training has no published checkpoint yet)."""
    if not run.is_dir():
        raise FileNotFoundError(f"--run: {run} is not a directory")
    rounds = sorted(p for p in run.glob("round-*") if re.fullmatch(r"round-\d+-\d+steps", p.name))
    found = [p for p in [run / "teacher", *rounds] if (p / "meta.json").is_file()]
    if not found:
        raise FileNotFoundError(f"--run: {run} has no finished checkpoint yet (teacher/ or round-*/ with a meta.json)")
    return found


class Points:
    """Where a checkpoint's points are scored: the FID set-up of its run (built once per run and overrides) and
    the chunks' executor (this process, or Ray tasks)."""

    def __init__(self, args: argparse.Namespace):
        self.args, self.specs = args, {}
        self.remote = None
        if args.workers:
            from raypd.distributed.cluster import connect

            connect()

    def spec(self, checkpoint: Path, meta):
        from raypd.config import config_from_dict
        from raypd.data.prepare import training_shards
        from raypd.data.shards import check_shards
        from raypd.eval.setup import fid_setup

        args = self.args
        run = checkpoint.resolve().parent
        key = (str(run), json.dumps(meta.config, sort_keys=True))
        if key not in self.specs:
            overrides = [f"eval.extractor={args.extractor}"] if args.extractor else []
            overrides += [f"eval.inception_weights={args.inception_weights}"] if args.inception_weights else []
            overrides += [f"eval.reference_samples={args.reference_samples}"] if args.reference_samples else []
            cfg = config_from_dict(meta.config, overrides)
            d = cfg.data
            urls = training_shards(d, run / "data", seed=cfg.run.seed)
            manifest = check_shards(urls, resolution=d.resolution, channels=d.channels, num_classes=d.num_classes,
                                    world_size=1, num_workers=0)
            self.specs[key] = cfg, fid_setup(cfg, urls, manifest, run)
        cfg, spec = self.specs[key]
        return cfg, dataclasses.replace(spec, seed=noise_seed(args, meta), num_samples=args.n)

    def features(self, model, meta, cfg, spec, steps: int, w: float | None) -> tuple[dict, str]:
        """The features of ``args.n`` samples, a chunk at a time (memory bounded by the chunk, not by ``args.n``),
        with a progress bar; and the precision the network sampled in."""
        import torch
        from tqdm import tqdm

        from raypd.eval.chunks import chunks_for, collect, run_here, sampling_name
        from raypd.eval.samples import NOISE_BLOCK

        args, d = self.args, meta.data
        precision = meta.config.get("eval", {}).get("precision", "auto")  # the run's, so its numbers come out again
        size = max(NOISE_BLOCK, -(-8 * args.batch // NOISE_BLOCK) * NOISE_BLOCK)
        if args.workers:
            size = cfg.eval.chunk_size
        chunks = chunks_for(args.n, "ddim", steps, data=d, seed=spec.seed, precision=precision,
                            extractor=spec.extractor, kid=spec.kid, prc=spec.prc, chunk_size=size, guidance=w)
        if args.workers:
            from raypd.distributed.evaluate import RayEvaluation

            results = RayEvaluation(cfg, workers=args.workers, use_gpu=args.use_gpu).run(model, chunks)
            sampling = sampling_name(precision, gpu=args.use_gpu)
        else:
            device = torch.device(args.device)
            results = run_here(model, chunks, logsnr_fn=meta.logsnr_fn(), device=device)
            sampling = sampling_name(precision, gpu=False, device=device)
        bar = tqdm(total=args.n, desc=f"{meta.kind} at {steps} steps", unit="img", file=sys.stderr)
        point = collect(results, n=args.n, shape=(d.channels, d.resolution, d.resolution), grid_size=0, full=None,
                        progress=lambda done, n: bar.update(done - bar.n))
        bar.close()
        return point.features, sampling


def score_points(args: argparse.Namespace, checkpoints: list[Path], record: dict) -> list[dict]:
    """Every checkpoint at every step count asked for (rows already in ``record`` are taken from it)."""
    from raypd.checkpoint import load_checkpoint, read_meta, weights_digest
    from raypd.eval.chunks import LABEL_HITS
    from raypd.eval.record import fingerprint

    points, rows = Points(args), []
    for checkpoint in checkpoints:
        meta = read_meta(checkpoint)
        cfg, spec = points.spec(checkpoint, meta)
        model, digest = None, weights_digest(checkpoint)
        for steps in args.steps or [meta.sampling_steps]:
            key = fingerprint(weights=digest, steps=steps, guidance=args.guidance,
                              spec=spec.identity(), sampling_precision=meta.config.get("eval", {}).get("precision"))
            if key in record:
                row = {**record[key], "checkpoint": str(checkpoint)}
                print(f"[fid] {checkpoint.name} at {steps} steps: FID {row['fid']:.2f} (scored before)",
                      file=sys.stderr, flush=True)
                rows.append(row)
                continue
            if model is None:
                model, meta = load_checkpoint(checkpoint, map_location=args.device if not args.workers else "cpu")
            w = guidance_of(args, model)
            features, sampling = points.features(model, meta, cfg, spec, steps, w)
            row = {"checkpoint": str(checkpoint), "kind": meta.kind, "steps": steps,
                   **({} if w is None else {"guidance": w}), **spec.score(features=features, sampling=sampling)}
            if LABEL_HITS in features:
                row["label_accuracy"] = float(features[LABEL_HITS].mean())
            record[key] = row
            rows.append(row)
    return rows


def table_lines(rows: list[dict]) -> list[str]:
    """The points as one Markdown table."""
    lines = ["| checkpoint | steps | FID | KID | samples | extractor |", "|---|---|---|---|---|---|"]
    for r in rows:
        kid = "-" if r.get("kid") is None else f"{r['kid']:.4f}"
        w = f" (w={r['guidance']:g})" if "guidance" in r else ""
        lines.append(f"| {Path(r['checkpoint']).name} | {r['steps']}{w} | {r['fid']:.2f} | {kid} | "
                     f"{r['n_samples']:,} | {r['extractor']} |")
    return lines


def fid_main(argv: list[str] | None = None) -> int:
    args = _args().parse_args(argv)
    from raypd.checkpoint import CheckpointError
    from raypd.data.shards import DataError

    if args.n < 2:
        print(f"error: --n must be >= 2, got {args.n}", file=sys.stderr)
        return 2
    if args.workers < 0:
        print(f"error: --workers must be >= 0, got {args.workers}", file=sys.stderr)
        return 2
    if any(s < 1 for s in args.steps or []):
        print(f"error: --steps must be >= 1, got {args.steps}", file=sys.stderr)
        return 2
    table = Path(args.table) if args.table else None
    saved = table.with_suffix(".json") if table else None
    record = json.loads(saved.read_text()) if saved and saved.is_file() else {}
    try:
        checkpoints = finished_checkpoints(Path(args.run)) if args.run else [Path(c) for c in args.checkpoint]
        rows = score_points(args, checkpoints, record)
    except (CheckpointError, DataError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        if saved is not None:
            saved.parent.mkdir(parents=True, exist_ok=True)
            saved.write_text(json.dumps(record, indent=1))
    for row in rows:
        print(json.dumps(row))
    if table is not None:
        table.write_text("\n".join(["# FID of checkpoints", "", *table_lines(rows), ""]))
        print(f"[fid] {len(rows)} point(s) in {table}", file=sys.stderr)
    elif len(rows) > 1:
        print("\n".join(table_lines(rows)), file=sys.stderr)
    return 0
