"""The claim, measured: distilled students against the teacher's own DDIM, by FID, per extractor.

Runs the local pipeline (real data: scikit-learn's digits, CPU) with the cheap classifier
extractor, then scores the same checkpoints, from the same noise, with Inception-v3. Prints, per
extractor, FID and KID at each step count for the teacher's DDIM and the distilled student, and
at 4, 2 and 1 steps the share of the DDIM-to-full-sampler gap the student closes
((FID_ddim - FID_distilled) / (FID_ddim - FID_full)) and its FID over the teacher's full-step FID.

    python tools/bench_quality.py [--out runs/bench-quality] [--samples 500] [--inception-weights PATH]
                                  [section.key=value ...]
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

from raypd.checkpoint import load_checkpoint
from raypd.config import config_from_dict, load_config
from raypd.data.prepare import training_shards
from raypd.data.shards import read_manifest
from raypd.diffusion import logsnr_schedule
from raypd.eval.evaluate import Evaluator
from raypd.pipeline import pick_device, run_pipeline
from raypd.train import freeze


def inception_rows(cfg, run: Path, summary: dict, weights: str | None) -> list[dict]:
    """Re-score the run's teacher and students with Inception, from the same noise."""
    cfg = config_from_dict(cfg.to_dict(), ["eval.extractor=inception"] + ([f"eval.inception_weights={weights}"] if weights else []))
    device = pick_device(cfg.run.device)
    urls = training_shards(cfg.data, run / "data", seed=cfg.run.seed)
    logsnr_fn = functools.partial(logsnr_schedule, logsnr_min=cfg.diffusion.logsnr_min, logsnr_max=cfg.diffusion.logsnr_max)
    teacher, _ = load_checkpoint(run / "teacher", map_location=device)
    steps = [r["student_steps"] for r in summary["rounds"] if r["student_steps"] <= 4]
    ev = Evaluator(cfg, run, device=device, logsnr_fn=logsnr_fn, urls=urls, manifest=read_manifest(urls),
                   teacher=freeze(teacher), step_counts=steps)
    rows = list(ev.rows)
    for r in summary["rounds"]:
        if r["student_steps"] in steps:
            student, _ = load_checkpoint(run / r["checkpoint"], map_location=device)
            rows.append(ev.student(freeze(student), r["student_steps"], r["round"]))
    return rows


def table(rows: list[dict], full_steps: int) -> list[str]:
    by = {(r["sampler"], r["steps"]): r for r in rows}
    full = by[("teacher_ddim", full_steps)]["fid"]
    head = f"{rows[0]['extractor']}, {rows[0]['n_samples']} samples; teacher at {full_steps} steps: FID {full:.2f}"
    lines = [head, "| steps | teacher DDIM FID | distilled FID | teacher DDIM KID | distilled KID | gap closed | distilled / full |",
             "|---|---|---|---|---|---|---|"]
    for n in sorted({r["steps"] for r in rows if r["sampler"] == "distilled"}, reverse=True):
        d, t = by[("distilled", n)], by[("teacher_ddim", n)]
        gap = (t["fid"] - d["fid"]) / (t["fid"] - full) if t["fid"] != full else float("nan")
        lines.append(f"| {n} | {t['fid']:.2f} | {d['fid']:.2f} | {t.get('kid', float('nan')):.4f} | "
                     f"{d.get('kid', float('nan')):.4f} | {100 * gap:.0f}% | {d['fid'] / full:.2f}x |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench-quality")
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--inception-weights", help="torch-fidelity-format Inception weights (offline machines)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    out = Path(args.out)
    cfg = load_config(None, [f"run.storage_path={out.parent}", f"run.name={out.name}",
                             f"eval.num_samples={args.samples}", *args.overrides])
    summary = run_pipeline(cfg)
    classifier_rows = summary["eval"]
    inception = inception_rows(cfg, out, summary, args.inception_weights)
    full_steps = summary["teacher"]["full_steps"]
    report = ["# Quality benchmark", "", f"run `{out}`, pipeline {summary['seconds']:.0f} s", ""]
    for rows in (classifier_rows, inception):
        report += table(rows, full_steps) + [""]
    text = "\n".join(report)
    (out / "bench_quality.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
