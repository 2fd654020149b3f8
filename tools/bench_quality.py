"""The paper's claim, measured with stated uncertainty: how much of the teacher's few-step gap the student
closes, at what FID, for what compute.

Runs the local pipeline (the README's run, or any config and overrides) on the digits or on MNIST's test
digits, then samples the teacher's full sampler, its DDIM at N steps and the distilled student at N steps
from the same noise with ``--samples`` samples each (the run's own evaluation noise, extended), and scores
them with each extractor. Every FID, the share of the gap the student closes,
``(FID_ddim - FID_distilled) / (FID_ddim - FID_full)``, and the student's FID over the teacher's full-step
FID come with a 95% paired-bootstrap interval over the samples (``raypd.eval.bootstrap``), withheld where the
resampled FIDs miss the FID they resample (too few samples for the features' dimension). ``--seeds K``
scores every point again from K independent noise seeds and states the mean with a 95% t-interval: the
interval to trust for Inception's 2,048-d features, where the bootstrap's resamples are not like fresh noise
(each seed costs another full set of samples and features). The cost line
is the paper's other claim: the distillation's compute down to N steps against the teacher's training
compute, in forward-equivalents of the network (a distillation example costs two teacher forwards and the
student's forward and backward, 5; a training example 3). A table of plain pixel statistics (intensity,
near-black and near-white shares, edge sharpness) of the training images and of the points Inception scores
tells a blurrier or greyer sampler from a difference only an extractor's features see; precision and recall
in each extractor's features tell samples unlike the training images (fidelity) from training images the
samples miss (diversity), and each point's FID to the teacher's own full-step samples, beside the floor that
two sets of those samples from different noise score, tells how far a student is from its teacher apart from
how far the teacher is from the data.

    python tools/bench_quality.py [--data digits|mnist] [--samples 2048] [--replicates 200]
        [--seeds 1] [--extractors classifier,inception] [--inception-steps 4] [--inception-weights PATH] [--no-fits]
        [--out runs/bench-quality-DATA] [section.key=value ...]

``--out`` naming a finished run (the README's ``raypd_runs/local``, say) rescores it without training again.

MNIST comes from the IDX files in ``--assets`` (default ``../shared/assets`` beside the repository); on a
machine with internet, any copy of ``t10k-images-idx3-ubyte.gz`` and its labels works. Inception costs about
0.15 s per image on a CPU, so by default it scores only the teacher's full sampler and the 4-step points.
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
import time
from pathlib import Path

import torch

from raypd.checkpoint import load_checkpoint
from raypd.config import config_from_dict, load_config
from raypd.data.prepare import training_shards
from raypd.data.shards import read_manifest
from raypd.diffusion import logsnr_schedule
from raypd.eval.bootstrap import Reference, across_seeds, fid, paired_bootstrap, withhold_biased
from raypd.eval.setup import read_images
from raypd.eval.fid import Extractor, fid_features, precision_recall, reference_fid_features, to_uint8
from raypd.eval.samples import NOISE_BLOCK, fixed_noise, sample_ddim
from raypd.eval.setup import fid_setup
from raypd.pipeline import pick_device, run_pipeline
from raypd.train import freeze

REPO = Path(__file__).resolve().parents[1]
MNIST = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def data_overrides(data: str, assets: Path) -> list[str]:
    if data == "digits":
        return []
    images, labels = (assets / name for name in MNIST)
    for path in (images, labels):
        if not path.is_file():
            raise SystemExit(f"--data mnist: {path} is missing (MNIST's test files; --assets names their folder)")
    return ["data.source=mnist", f"data.path={images}", f"data.labels_path={labels}", "data.num_classes=0"]


def generate(model, n: int, steps: int, *, cfg, logsnr_fn, device, seed: int | None = None) -> torch.Tensor:
    """uint8 DDIM samples from the first ``n`` of the noise of ``seed`` (default: the run's evaluation noise),
    a noise block at a time."""
    d, parts = cfg.data, []
    seed = cfg.eval.seed if seed is None else seed
    z, y = fixed_noise(n, d.channels, d.resolution, seed=seed, num_classes=d.num_classes)
    for lo in range(0, n, NOISE_BLOCK):
        hi = min(n, lo + NOISE_BLOCK)
        parts.append(to_uint8(sample_ddim(model, z[lo:hi], None if y is None else y[lo:hi], steps,
                                          logsnr_fn=logsnr_fn, device=device)))
    return torch.cat(parts)


def rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    """Root-mean-square distance of two uint8 image sets, in [-1, 1] units."""
    return float((a.double() - b.double()).square().mean().sqrt() / 127.5)


def pixel_statistics(sets: dict[str, torch.Tensor]) -> list[str]:
    """Plain pixel statistics of uint8 image sets: whether a sampler is blurrier, greyer or more saturated than
    the data, which would show in FID without being a feature of any extractor."""
    lines = ["## Pixels", "",
             "Intensity in [0, 1]: mean, share of pixels near black (< 8/255), near white (> 247/255) and mid-grey "
             "(64..191), and the mean absolute difference of neighbouring pixels (edge sharpness).", "",
             "| images | mean | near black | near white | mid-grey | neighbour difference |",
             "|---|---|---|---|---|---|"]
    for name, images in sets.items():
        x = images.double()
        edges = ((x[..., :, 1:] - x[..., :, :-1]).abs().mean() + (x[..., 1:, :] - x[..., :-1, :]).abs().mean()) / 2
        lines.append(f"| {name} | {x.mean() / 255:.4f} | {(x < 8).double().mean():.4f} | "
                     f"{(x > 247).double().mean():.4f} | {((x >= 64) & (x <= 191)).double().mean():.4f} | "
                     f"{edges / 255:.4f} |")
    return lines + [""]


def error_by_frequency(sets: dict[str, torch.Tensor], reference: torch.Tensor) -> list[str]:
    """Where in the spectrum each sampler's samples differ from the teacher's full sampler's from the same noise:
    the RMSE of the difference split into coarse (below a third of the Nyquist frequency), middle and fine
    (above two thirds) spatial frequencies, whose squares add up to the whole (Parseval). An error in fine
    detail is one an extractor looking at upsampled strokes can weigh far more than a classifier does."""
    lines = ["## The difference from the teacher's full sampler, by spatial frequency", "",
             "RMSE in [-1, 1] pixel units of each sample minus the teacher's full-step sample from the same noise, "
             "split by radial frequency (fraction of Nyquist); the squares of the bands add up to the total.", "",
             "| images | total | coarse (< 1/3) | middle | fine (>= 2/3) |", "|---|---|---|---|---|"]
    for name, images in sets.items():
        diff = (images.double() - reference.double()) / 127.5
        h, w = diff.shape[-2:]
        power = torch.fft.fft2(diff, norm="ortho").abs().square().sum(dim=tuple(range(diff.dim() - 2)))
        fy, fx = torch.fft.fftfreq(h).abs()[:, None], torch.fft.fftfreq(w).abs()[None, :]
        radius = torch.sqrt(fy.square() + fx.square()) / 0.5
        total = power.sum()
        bands = [power[radius < 1 / 3].sum(), power[(radius >= 1 / 3) & (radius < 2 / 3)].sum(),
                 power[radius >= 2 / 3].sum()]
        count = diff.numel()
        lines.append(f"| {name} | {float(total / count) ** 0.5:.4f} | "
                     + " | ".join(f"{float(b / count) ** 0.5:.4f}" for b in bands) + " |")
    return lines + [""]


def where_the_gap_comes_from(summary, run, teacher, point, full, n, *, cfg, logsnr_fn, device) -> list[str]:
    """Each round's own fit (its student's N steps against its teacher's 2N steps, what the round was trained to
    match) next to the distance to the full sampler it ends at: does the error come from one round, or build up
    round after round?"""
    lines = ["## Where the gap comes from", "",
             f"RMSE in [-1, 1] pixel units over the first {n} samples (same noise). A round's fit is its student at N "
             "steps against its own teacher at 2N steps; the chain's distance is the student against the teacher's "
             "full sampler.", "",
             "| round | steps | round's fit | student to full | teacher DDIM at N to full | final loss |",
             "|---|---|---|---|---|---|"]
    previous = teacher
    for r in summary["rounds"]:
        student = freeze(load_checkpoint(run / r["checkpoint"], map_location=device)[0])
        mine = point("distilled", r["student_steps"])[:n]
        theirs = generate(previous, n, r["teacher_steps"], cfg=cfg, logsnr_fn=logsnr_fn, device=device)
        reference = point("teacher_ddim", full)[:n]
        lines.append(f"| {r['round']} | {r['teacher_steps']} -> {r['student_steps']} | {rmse(mine, theirs):.4f} | "
                     f"{rmse(mine, reference):.4f} | {rmse(point('teacher_ddim', r['student_steps'])[:n], reference):.4f} "
                     f"| {r['final_loss']:.5f} |")
        previous = student
    return lines + [""]


def with_interval(interval, *, scale: float = 1.0, digits: int = 2, unit: str = "") -> str:
    """A value with its interval in brackets, or alone where no interval is stated (NaN bounds)."""
    value = f"{scale * interval.value:.{digits}f}{unit}"
    if math.isnan(interval.low):
        return value
    return f"{value} [{scale * interval.low:.{digits}f}, {scale * interval.high:.{digits}f}]"


def fmt(interval) -> str:
    return with_interval(interval)


def pct(interval) -> str:
    return with_interval(interval, scale=100, digits=1, unit="%")


def ratio(interval) -> str:
    return with_interval(interval, digits=3, unit="x")


def across_noise_seeds(seeds, result, keys, stats, scored, full, reference, features_of) -> list[str]:
    """Every point scored again from each further noise seed: the mean over the seeds with a 95% t-interval, and
    the gap closed under each seed (the first seed's FIDs are the bootstrap's values)."""
    began = time.perf_counter()
    per_seed = [{name: interval.value for name, interval in result.items()}]
    for seed in seeds[1:]:
        fids = {f"{s}@{n}": fid(features_of(s, n, seed), reference) for s, n in keys}
        per_seed.append({**fids, **{name: stat(fids) for name, stat in stats.items()}})
    across = {name: across_seeds([p[name] for p in per_seed]) for name in per_seed[0]}
    lines = [f"Across {len(seeds)} noise seeds ({', '.join(map(str, seeds))}): mean and 95% t-interval of the mean; "
             f"teacher at {full} steps: FID {fmt(across[f'teacher_ddim@{full}'])}; scored in "
             f"{time.perf_counter() - began:.0f} s", "",
             "| steps | teacher DDIM FID | distilled FID | gap closed | distilled / full | gap closed, seed by seed |",
             "|---|---|---|---|---|---|"]
    for n in scored:
        each = ", ".join(f"{100 * p[f'gap@{n}']:.1f}%" for p in per_seed)
        lines.append(f"| {n} | {fmt(across[f'teacher_ddim@{n}'])} | {fmt(across[f'distilled@{n}'])} | "
                     f"{pct(across[f'gap@{n}'])} | {ratio(across[f'ratio@{n}'])} | {each} |")
    return lines + [""]


def fidelity_and_diversity(features, ref_features, extractor, keys, floor) -> list[str]:
    """What a point's FID is made of (first noise seed): precision (samples that look like training images),
    recall (training images the samples cover) and the FID to the teacher's full sampler's own samples (``keys``:
    the scored points, the teacher's full sampler first). ``floor``: features of the teacher's full sampler from
    another noise seed, whose FID to the first is what the same distribution scores at this sample count."""
    full = f"{keys[0][0]}@{keys[0][1]}"
    teacher = Reference.of(features[full])
    lines = [f"Fidelity and diversity ({extractor.name}, the first noise seed): precision and recall against the "
             "reference (k = 3 neighbours), and the FID to the teacher's full-step samples. The points share the "
             "teacher's noise, so a perfect student would score 0 there; the last row is the teacher's full "
             "sampler from another noise seed: what a fresh draw of the teacher's own distribution scores at this "
             "count", "",
             "| sampler | precision | recall | FID to the teacher's samples |", "|---|---|---|---|"]
    rows = [(f"{sampler} at {n} steps", features[f"{sampler}@{n}"]) for sampler, n in keys]
    rows.append((f"{keys[0][0]} at {keys[0][1]} steps, another noise seed", floor))
    for i, (name, feats) in enumerate(rows):
        precision, recall = precision_recall(feats, ref_features, extractor)
        lines.append(f"| {name} | {precision:.3f} | {recall:.3f} | {fid(feats, teacher) if i else 0.0:.2f} |")
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=("digits", "mnist"), default="digits")
    parser.add_argument("--assets", default=str(REPO.parent / "shared" / "assets"))
    parser.add_argument("--out", help="the run's directory (default runs/bench-quality-DATA)")
    parser.add_argument("--samples", type=int, default=2048, help="samples per point (>= 2000 for a tight interval)")
    parser.add_argument("--replicates", type=int, default=200, help="bootstrap replicates")
    parser.add_argument("--seeds", type=int, default=1,
                        help="independent noise seeds to score every point from (>= 2: an interval across seeds)")
    parser.add_argument("--extractors", default="classifier,inception")
    parser.add_argument("--inception-steps", default="4",
                        help="step counts Inception scores besides the full sampler ('all' for every round's)")
    parser.add_argument("--inception-weights", help="torch-fidelity-format Inception weights (offline machines)")
    parser.add_argument("--no-fits", action="store_true", help="skip each round's own fit (its teacher's samples)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    out = Path(args.out or f"runs/bench-quality-{args.data}")
    extractors = [e.strip() for e in args.extractors.split(",") if e.strip()]
    for e in extractors:
        if e not in ("classifier", "inception"):
            raise SystemExit(f"--extractors: unknown extractor {e!r} (classifier, inception)")
    if args.samples < 2 or args.replicates < 2:
        raise SystemExit(f"--samples and --replicates must be >= 2, got {args.samples} and {args.replicates}")
    if args.seeds < 1:
        raise SystemExit(f"--seeds must be >= 1, got {args.seeds}")
    cfg = load_config(None, [f"run.storage_path={out.parent}", f"run.name={out.name}",
                             *data_overrides(args.data, Path(args.assets)), *args.overrides])
    if cfg.distill.guided or cfg.eval.guidance:
        raise SystemExit("this benchmark measures unguided samplers; a guided run's report.md has its FID and label "
                         "accuracy at every guidance weight")
    started = time.perf_counter()
    summary = run_pipeline(cfg)
    run = Path(summary["run"])
    device = pick_device(cfg.run.device)
    logsnr_fn = functools.partial(logsnr_schedule, logsnr_min=cfg.diffusion.logsnr_min, logsnr_max=cfg.diffusion.logsnr_max)
    urls = training_shards(cfg.data, run / "data", seed=cfg.run.seed)
    manifest = read_manifest(urls)
    full = summary["teacher"]["full_steps"]
    steps = sorted({r["student_steps"] for r in summary["rounds"]}, reverse=True)
    teacher_path = run / summary["teacher"]["checkpoint"] if "checkpoint" in summary["teacher"] else \
        Path(cfg.teacher.checkpoint or run / "teacher")  # a summary written before it named the teacher's
    teacher = freeze(load_checkpoint(teacher_path, map_location=device)[0])

    images: dict[tuple[str, int, int], torch.Tensor] = {}
    seeds = [cfg.eval.seed + i for i in range(args.seeds)]

    def point(sampler: str, n: int, seed: int = seeds[0]) -> torch.Tensor:
        if (sampler, n, seed) not in images:
            began = time.perf_counter()
            if sampler == "teacher_ddim":
                model = teacher
            else:
                checkpoint = next(r["checkpoint"] for r in summary["rounds"] if r["student_steps"] == n)
                model = freeze(load_checkpoint(run / checkpoint, map_location=device)[0])
            images[sampler, n, seed] = generate(model, args.samples, n, cfg=cfg, logsnr_fn=logsnr_fn, device=device,
                                                seed=seed)
            log(f"[bench] {sampler} at {n} steps, noise seed {seed}: {args.samples} samples in "
                f"{time.perf_counter() - began:.0f} s")
        return images[sampler, n, seed]

    report = [f"# Quality benchmark: {args.data}", "",
              f"run `{run}` (pipeline {summary['seconds']:.0f} s); {args.samples} samples per point from the run's "
              f"noise (seed {cfg.eval.seed}); 95% paired-bootstrap intervals over {args.replicates} resamplings of "
              "the samples, the reference statistics fixed", ""]
    few = steps if args.inception_steps == "all" else [n for n in steps if str(n) in args.inception_steps.split(",")]
    for kind in extractors:
        ecfg = config_from_dict(cfg.to_dict(), [f"eval.extractor={kind}", f"eval.num_samples={args.samples}"]
                                + ([f"eval.inception_weights={args.inception_weights}"] if args.inception_weights else []))
        spec = fid_setup(ecfg, urls, manifest, run)
        extractor: Extractor = spec.extractor
        scored = steps if kind == "classifier" else few
        began = time.perf_counter()
        log(f"[bench] {extractor.name}: features of {spec.reference_count} reference images (cached after the first "
            "time) and of every point")
        ref_features = reference_fid_features(spec.reference(), extractor, cache_root=Path(spec.cache_root),
                                              cache_name=spec.cache_name)
        reference = Reference.of(ref_features)
        keys = [("teacher_ddim", full)] + [(s, n) for n in scored for s in ("teacher_ddim", "distilled")]
        extracted: dict[tuple[str, int, int], torch.Tensor] = {}

        def features_of(sampler: str, n: int, seed: int = seeds[0]) -> torch.Tensor:
            if (sampler, n, seed) not in extracted:
                extracted[sampler, n, seed] = fid_features(point(sampler, n, seed), extractor)
            return extracted[sampler, n, seed]

        features = {f"{s}@{n}": features_of(s, n) for s, n in keys}
        stats = {}
        for n in scored:
            ddim, dist, base = f"teacher_ddim@{n}", f"distilled@{n}", f"teacher_ddim@{full}"
            stats[f"gap@{n}"] = lambda f, ddim=ddim, dist=dist, base=base: (f[ddim] - f[dist]) / (f[ddim] - f[base])
            stats[f"ratio@{n}"] = lambda f, dist=dist, base=base: f[dist] / f[base]
        result = paired_bootstrap(features, reference, replicates=args.replicates, seed=cfg.eval.seed, statistics=stats)
        bootstrapped = result
        result, missed = withhold_biased(result, features)
        report += [f"## {extractor.name}", "",
                   f"{len(reference.mean)}-d features, reference {spec.reference_count} training images; teacher at "
                   f"{full} steps: FID {fmt(result[f'teacher_ddim@{full}'])}; scored in "
                   f"{time.perf_counter() - began:.0f} s", ""]
        if missed:
            worst = bootstrapped[missed[0]]
            report += [f"No bootstrap intervals: with {args.samples} samples of {len(reference.mean)}-d features the "
                       f"resampled FIDs miss the FIDs themselves ({missed[0]}: {worst.value:.2f}, resampled "
                       f"{worst.low:.2f} to {worst.high:.2f}); a resample's repeated rows bias it upwards. "
                       + ("The intervals across noise seeds below are the ones to read." if len(seeds) > 1 else
                          "`--seeds 3` (or more) states intervals across fresh noise instead."), ""]
        report += [
                   "| steps | teacher DDIM FID | distilled FID | gap closed | distilled / full |", "|---|---|---|---|---|"]
        for n in scored:
            report.append(f"| {n} | {fmt(result[f'teacher_ddim@{n}'])} | {fmt(result[f'distilled@{n}'])} | "
                          f"{pct(result[f'gap@{n}'])} | {ratio(result[f'ratio@{n}'])} |")
        report.append("")
        if len(seeds) > 1:
            report += across_noise_seeds(seeds, result, keys, stats, scored, full, reference, features_of)
        floor = features_of("teacher_ddim", full, seeds[1] if len(seeds) > 1 else seeds[0] + 1)
        report += fidelity_and_diversity(features, ref_features, extractor, keys, floor)
    data = read_images(urls, cfg.eval.reference_samples, channels=cfg.data.channels, resolution=cfg.data.resolution)
    shown = {f"training images ({len(data)})": data, f"teacher_ddim at {full} steps": point("teacher_ddim", full)}
    few_points = {f"{s} at {n} steps": point(s, n) for n in few for s in ("teacher_ddim", "distilled")}
    report += pixel_statistics({**shown, **few_points})
    report += error_by_frequency(few_points, point("teacher_ddim", full))
    far = {n: rmse(point("teacher_ddim", n), point("teacher_ddim", full)) for n in few}
    closed = [f"{n} steps {100 * (1 - rmse(point('distilled', n), point('teacher_ddim', full)) / far[n]):.1f}%"
              for n in few]
    report += ["The share of the DDIM's distance to the full sampler (RMSE from the same noise) the student closes: "
               + ", ".join(closed) + "; set it beside each extractor's gap closed.", ""]
    report += [] if args.no_fits else where_the_gap_comes_from(summary, run, teacher, point, full, min(args.samples, 1024), cfg=cfg,
                                       logsnr_fn=logsnr_fn, device=device)
    teacher_cost = summary["teacher"].get("compute")
    report += ["## Compute", "", "| distilled down to | distillation (forward-equivalents) | x the teacher's training |",
               "|---|---|---|"]
    for r in summary["rounds"]:
        if "compute" not in r:  # a summary written before raypd counted compute
            report.append(f"| {r['student_steps']} steps | - | - |")
            continue
        share = f"{r['compute'] / teacher_cost:.3f}" if teacher_cost else "-"
        report.append(f"| {r['student_steps']} steps | {r['compute']:,.0f} | {share} |")
    report += ["", f"The teacher's training: {teacher_cost:,.0f} forward-equivalents." if teacher_cost else
               "The teacher's training cost is unknown (a given or imported teacher).",
               "", f"benchmark wall time {time.perf_counter() - started:.0f} s"]
    text = "\n".join(report)
    (run / "bench_quality.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
