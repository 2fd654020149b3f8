"""``raypd compare``: distillation methods side by side, from their finished runs.

    raypd compare runs/pd runs/tract [--out comparison]

Every run's ``summary.json`` gives its students' FID at each step count and the distillation compute spent to
reach that student (forward-equivalents, counted from the teacher on). One table (``comparison.md``) and one plot
(``comparison.png``: FID against compute, a curve per run, each point labelled with its step count). The runs must
be comparable: the same teacher weights, FID extractor, reference set, sample count and noise seed; a run that
differs is refused, naming what differs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from raypd.eval.report import fmt
from raypd.methods import METHODS



class CompareError(ValueError):
    pass


def load_run(path: str | Path) -> dict:
    """A finished run's summary, with its directory; refuses a folder that holds none."""
    path = Path(path)
    summary = path / "summary.json"
    if not summary.is_file():
        raise CompareError(f"{path}: no summary.json; raypd compare reads finished runs' directories (the run's "
                           "run.storage_path/run.name)")
    data = json.loads(summary.read_text())
    if not data.get("rounds") or not data.get("eval"):
        raise CompareError(f"{summary}: the run has no evaluated rounds to compare")
    if any("guidance" in row for row in data["eval"]):
        raise CompareError(f"{path}: a guided run, scored once per guidance weight; raypd compare compares "
                           "unguided runs (a guided run's report.md and fid_vs_guidance.png compare its samplers at "
                           "every weight)")
    if not data["teacher"].get("digest") and (path / "teacher" / "model.safetensors").is_file():
        from raypd.checkpoint import weights_digest  # a summary written before it recorded the teacher's digest

        data["teacher"]["digest"] = weights_digest(path / "teacher")
    return {"path": path, **data}


def _identity(summary: dict) -> dict:
    """What must agree between runs for their FIDs to compare."""
    row = summary["eval"][0]
    p = row.get("protocol", {})
    return {"teacher weights": summary["teacher"].get("digest"),
            "FID extractor": p.get("extractor", {}).get("weights_sha256", row.get("extractor")),
            "reference set": p.get("reference", {}).get("sha256"), "samples per point": row.get("n_samples"),
            "noise seed": summary.get("eval_seed"), "teacher's full step count": summary["teacher"]["full_steps"]}


def check_comparable(runs: list[dict]) -> None:
    first = _identity(runs[0])
    for run in runs[1:]:
        mine = _identity(run)
        differ = [k for k in first if first[k] != mine[k]]
        if differ:
            what = "; ".join(f"{k}: {first[k]} vs {mine[k]}" for k in differ)
            raise CompareError(f"{run['path']} cannot be compared with {runs[0]['path']}: {what}. Compare runs "
                               "distilled from the same teacher and evaluated with the same eval settings")


def points(run: dict) -> list[dict]:
    """Each student of the run: its steps, FID, KID and the distillation compute spent up to it."""
    fids = {r["steps"]: r for r in run["eval"] if r["sampler"] == "distilled"}
    teacher = run["teacher"].get("compute")
    out = []
    for r in run["rounds"]:
        row = fids.get(r["student_steps"], {})
        compute = r.get("compute")
        out.append({"steps": r["student_steps"], "fid": row.get("fid"), "kid": row.get("kid"), "compute": compute,
                    "x_teacher": compute / teacher if compute is not None and teacher else None})
    return out


def _teacher_full(run: dict) -> dict:
    """The run's row for the teacher's full sampler ({} when it has none)."""
    return next((r for r in run["eval"] if r["sampler"] == "teacher_ddim"
                 and r["steps"] == run["teacher"]["full_steps"]), {})


def label(run: dict) -> str:
    name = run.get("method", "progressive")
    title = run.get("method_title") or (METHODS[name].title if name in METHODS else name)
    return f"{title} ({run['path'].name})"


def write_comparison(runs: list[dict], out: Path) -> Path:
    """comparison.md, comparison.png and comparison.json in ``out``; returns the markdown's path."""
    check_comparable(runs)
    out.mkdir(parents=True, exist_ok=True)
    table = [{"run": str(r["path"]), "method": r.get("method", "progressive"), "points": points(r)} for r in runs]
    (out / "comparison.json").write_text(json.dumps(table, indent=1))
    plot_comparison(runs, out / "comparison.png")
    first = runs[0]
    full = _teacher_full(first)
    teacher_cost = first["teacher"].get("compute")
    steps = sorted({p["steps"] for t in table for p in t["points"]}, reverse=True)
    ddim = {r["steps"]: r["fid"] for r in first["eval"] if r["sampler"] == "teacher_ddim"}
    lines = ["# Distillation methods compared", "",
             f"Same teacher, same noise, same reference set: {first['eval'][0]['extractor']} FID over "
             f"{first['eval'][0]['n_samples']} samples per point. The teacher's {first['teacher']['full_steps']}-step "
             f"sampler scores {fmt(full.get('fid'), '.2f')}"
             + (f"; training it cost {teacher_cost:,.0f} forward-equivalents." if teacher_cost else "."),
             "Compute: the distillation's forward-equivalents spent up to that student (5 per distillation "
             "example, 7 for sCD's tangent; the Denoising Student's pairs at their sampler's steps each, then 3 per "
             "example), and as a multiple of the teacher's training.", "", "![FID against compute](comparison.png)",
             "", "| steps | teacher DDIM FID | " + " | ".join(label(r) for r in runs) + " |",
             "|---|---|" + "---|" * len(runs)]
    for n in steps:
        cells = []
        for t in table:
            p = next((p for p in t["points"] if p["steps"] == n), None)
            cells.append("-" if p is None else f"{fmt(p['fid'], '.2f')} at {fmt(p['compute'], ',.0f')}"
                         f" ({fmt(p['x_teacher'], '.2f')}x)")
        lines.append(f"| {n} | {fmt(ddim.get(n), '.2f')} | " + " | ".join(cells) + " |")
    lines += ["", "Each cell: FID at compute (x the teacher's training).", ""]
    path = out / "comparison.md"
    path.write_text("\n".join(lines))
    return path


def plot_comparison(runs: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for run in runs:
        pts = [p for p in points(run) if p["fid"] is not None and p["compute"] is not None]
        if not pts:
            continue
        line, = ax.plot([p["compute"] for p in pts], [p["fid"] for p in pts], "o-", label=label(run))
        for p in pts:
            ax.annotate(f"{p['steps']}", (p["compute"], p["fid"]), textcoords="offset points", xytext=(4, 4),
                        fontsize=7, color=line.get_color())
    first = runs[0]
    full = _teacher_full(first)
    if full:
        ax.axhline(full["fid"], color="grey", lw=1, ls="-.", label=f"teacher, {first['teacher']['full_steps']} steps")
    ax.set_xscale("log")  # the students' FIDs span little: a linear axis reads better
    ax.set_xlabel("distillation compute (forward-equivalents); labels: sampling steps")
    ax.set_ylabel(f"FID ({first['eval'][0]['extractor']}, {first['eval'][0]['n_samples']} samples)", fontsize=8)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def compare_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="raypd compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="finished runs' directories")
    parser.add_argument("--out", default="comparison", help="where comparison.md/.png/.json go")
    args = parser.parse_args(argv)
    try:
        runs = [load_run(p) for p in args.runs]
        path = write_comparison(runs, Path(args.out))
    except CompareError as err:
        print(f"raypd compare: {err}", file=sys.stderr)
        return 2
    print(path.read_text())
    print(f"written: {path}, {path.with_suffix('.png')}", file=sys.stderr)
    return 0
