"""Distillation methods from one teacher, at equal distillation compute, on one table.

Runs (or reuses, with ``--pd RUN``) the local pipeline with progressive distillation, then distils the same
teacher under the same data, eval and optimizer settings with TRACT, its phases sharing the progressive run's
total update budget equally (so its compute is at most the progressive run's), and with the Denoising Student,
``--ds-pairs`` pairs of the teacher's DDIM and as many updates as the rest of the same compute buys, and with
consistency distillation at each of ``--cm-segments`` (1: a consistency model, sampled in one step; more: multistep
consistency), each spending the progressive run's whole update budget (an update costs the same five forwards: one
teacher step, one target-network forward, the student's forward and backward), and with sCD at each of
``--scd-steps`` (its updates cost 7 forwards, so it gets 5/7 of the budget). It compares them with ``raypd
compare``: FID at each step count against the distillation compute spent to reach it.

    python tools/bench_methods.py [--data digits|mnist] [--pd RUN] [--tract-phases 8,2,1] [--ds-pairs 4096]
        [--cm-segments 1,2] [--scd-steps 1,2] [--out runs/bench-methods-DATA] [section.key=value ...]

``--pd`` names a finished progressive run (the README's ``raypd_runs/local``, say): its teacher and its
config are reused, and nothing of it is trained again. The published order, for reference: TRACT's 1- and
2-step FID below progressive distillation's at equal or lower compute (Berthelot et al. 2023), the Denoising
Student's one step above progressive distillation's (Salimans & Ho 2022, Table 2); consistency distillation's one
step below progressive distillation's (Song et al. 2023), multistep consistency's two steps below TRACT's and
progressive distillation's (Heek et al. 2024).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

from bench_quality import data_overrides  # noqa: E402

from raypd.compare import load_run, write_comparison  # noqa: E402
from raypd.config import config_from_dict, load_config, migrate  # noqa: E402
from raypd.pipeline import run_pipeline  # noqa: E402
from raypd.runs import CONFIG  # noqa: E402
from raypd.train.rounds import TRAIN_FORWARDS  # noqa: E402


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=("digits", "mnist"), default="digits")
    parser.add_argument("--assets", default=str(REPO.parent / "shared" / "assets"))
    parser.add_argument("--pd", help="a finished progressive run to reuse (its teacher and config)")
    parser.add_argument("--tract-phases", default="8,2,1",
                        help="TRACT's student step counts, comma-separated (empty: no run)")
    parser.add_argument("--ds-pairs", type=int, default=4096, help="the Denoising Student's pairs (0: no run)")
    parser.add_argument("--cm-segments", default="1,2",
                        help="consistency distillation's segment counts, comma-separated (empty: no run)")
    parser.add_argument("--scd-steps", default="1,2",
                        help="sCD students' sampling step counts, comma-separated (empty: no run)")
    parser.add_argument("--out", help="where the runs and the comparison go (default runs/bench-methods-DATA)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    out = Path(args.out or f"runs/bench-methods-{args.data}")
    phases = [int(p) for p in args.tract_phases.split(",") if p.strip()]
    began = time.perf_counter()
    if args.pd:
        pd_dir = Path(args.pd)
        if not (pd_dir / CONFIG).is_file():
            raise SystemExit(f"--pd {pd_dir}: not a run directory (no {CONFIG})")
        base = migrate(json.loads((pd_dir / CONFIG).read_text()))
        method = base["distill"].get("method", "progressive")
        if method != "progressive":
            raise SystemExit(f"--pd {pd_dir}: its distill.method is {method}, not progressive")
        pd = run_pipeline(config_from_dict(base, []))  # finished: returns its summary untouched
    else:
        cfg = load_config(None, [f"run.storage_path={out}", "run.name=progressive",
                                 *data_overrides(args.data, Path(args.assets)), *args.overrides])
        pd = run_pipeline(cfg)
        pd_dir, base = Path(pd["run"]), cfg.to_dict()
    if any("guidance" in r for r in pd["rounds"]):
        raise SystemExit("this benchmark compares unguided methods (raypd compare refuses guided runs); distil a "
                         "guided teacher with distill.guidance_max and read its report instead")
    budget = sum(r["updates"] for r in pd["rounds"])
    log(f"[bench] progressive: {len(pd['rounds'])} rounds, {budget} updates")
    runs, tract_updates = [pd_dir], 0
    if phases:
        per_phase = budget // len(phases)
        log(f"[bench] TRACT {base['distill']['start_steps']} -> {' -> '.join(map(str, phases))}: {per_phase} "
            "updates per phase")
        tract = run_pipeline(config_from_dict(base, [
            f"run.storage_path={out}", "run.name=tract", f"teacher.checkpoint={(pd_dir / 'teacher').resolve()}",
            "distill.method=tract", f"distill.tract.phases=[{','.join(map(str, phases))}]",
            f"distill.updates_per_round={per_phase}", "distill.late_rounds_factor=1.0"]))
        runs.append(Path(tract["run"]))
        tract_updates = sum(r["updates"] for r in tract["rounds"])
    if args.ds_pairs:
        batch, steps = base["distill"]["batch_size"], base["distill"]["start_steps"]
        left = pd["rounds"][-1]["compute"] - args.ds_pairs * steps
        updates = int(left // (batch * TRAIN_FORWARDS))
        if updates < 1:
            raise SystemExit(f"--ds-pairs {args.ds_pairs}: sampling them ({args.ds_pairs * steps:,} forwards) costs "
                             f"all of the progressive run's {pd['rounds'][-1]['compute']:,.0f}; use fewer")
        log(f"[bench] Denoising Student: {args.ds_pairs} pairs of the {steps}-step DDIM, {updates} updates")
        ds = run_pipeline(config_from_dict(base, [
            f"run.storage_path={out}", "run.name=denoising-student",
            f"teacher.checkpoint={(pd_dir / 'teacher').resolve()}", "distill.method=denoising_student",
            f"distill.denoising_student.pairs={args.ds_pairs}", f"distill.updates_per_round={updates}",
            "distill.late_rounds_factor=1.0"]))
        runs.append(Path(ds["run"]))
    for segments in [int(p) for p in args.cm_segments.split(",") if p.strip()]:
        steps = base["distill"]["start_steps"]
        initial = max(segments, steps // 4)  # the teacher's grid doubles twice over the stage
        log(f"[bench] consistency, {segments} segment(s): teacher grid {initial} -> {steps} steps, {budget} updates")
        cm = run_pipeline(config_from_dict(base, [
            f"run.storage_path={out}", f"run.name=consistency-{segments}",
            f"teacher.checkpoint={(pd_dir / 'teacher').resolve()}", "distill.method=consistency",
            f"distill.consistency.segments={segments}", f"distill.end_steps={segments}",
            f"distill.consistency.initial_steps={initial}", f"distill.updates_per_round={budget}",
            "distill.late_rounds_factor=1.0"]))
        runs.append(Path(cm["run"]))
    for steps in [int(p) for p in args.scd_steps.split(",") if p.strip()]:
        updates = budget * 5 // 7
        log(f"[bench] sCD, {steps}-step student: {updates} updates, tangent warm-up over the first fifth")
        scd = run_pipeline(config_from_dict(base, [
            f"run.storage_path={out}", f"run.name=scd-{steps}", f"teacher.checkpoint={(pd_dir / 'teacher').resolve()}",
            "distill.method=scd", f"distill.end_steps={steps}", f"distill.scd.warmup_updates={max(1, updates // 5)}",
            f"distill.updates_per_round={updates}", "distill.late_rounds_factor=1.0"]))
        runs.append(Path(scd["run"]))
    path = write_comparison([load_run(p) for p in runs], out / "comparison")
    print(path.read_text())
    print(f"distillation updates: progressive {budget}, TRACT {tract_updates}; "
          f"bench {time.perf_counter() - began:.0f} s; written {path} and {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
