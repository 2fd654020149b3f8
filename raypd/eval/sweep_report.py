"""Reports of Tune sweeps: per round a trial table and learning curves, across rounds the choices.

Markdown for reading, CSV and JSON for scripts, PNG for the curves. The data comes in as plain rows
(one per trial), so this module knows nothing about Ray.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

COLUMNS = ("trial", "lr", "updates", "status", "updates_done", "heldout_loss", "fid", "wall_seconds", "starts")


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if value < 1e29 else "diverged"
    return str(value)


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    keys = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(curves: dict[str, list[tuple[int, float]]], rows: list[dict[str, Any]], chosen: str, path: Path,
                title: str) -> Path:
    """Held-out loss against updates, one line per trial, the chosen one drawn thick."""
    plt = _pyplot()
    by_id = {r["trial"]: r for r in rows}
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for trial, points in sorted(curves.items()):
        points = [(u, v) for u, v in points if v < 1e29]
        if not points:
            continue
        row = by_id.get(trial, {})
        label = f"{trial} lr {row.get('lr', 0):.2g} ({row.get('status', '?')})"
        ax.plot([u for u, _ in points], [v for _, v in points], marker="o", markersize=3,
                linewidth=3 if trial == chosen else 1.2, label=label)
    ax.set_xlabel("update")
    ax.set_ylabel("held-out distillation loss")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_round_report(sweep_dir: Path, *, rnd, rows: list[dict[str, Any]], curves: dict[str, list[tuple[int, float]]],
                       chosen: dict[str, Any], reason: str) -> Path:
    """trials.csv, trials.json, curves.png and report.md in ``sweep_dir``; returns the report's path."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    _write_csv(sweep_dir / "trials.csv", rows)
    (sweep_dir / "trials.json").write_text(json.dumps({"round": rnd.index, "teacher_steps": rnd.teacher_steps,
                                                       "student_steps": rnd.student_steps, "chosen": chosen["trial"],
                                                       "reason": reason, "trials": rows}, indent=2))
    title = f"round {rnd.index}: {rnd.teacher_steps} -> {rnd.student_steps} steps"
    plot_curves(curves, rows, chosen["trial"], sweep_dir / "curves.png", title)
    seeded = any("fid_by_seed" in r for r in rows)
    extra = [k for k in dict.fromkeys(k for r in rows for k in r) if k not in (*COLUMNS, "error", "fid_by_seed")]
    cols = list(COLUMNS[:3]) + extra + list(COLUMNS[3:7]) + ["fid_by_seed"] * seeded + list(COLUMNS[7:])
    lines = [f"# Sweep of {title}", "",
             f"Chosen: **{chosen['trial']}** (lr {chosen['lr']:.3g}, {chosen['updates']} updates): {reason}.", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in sorted(rows, key=lambda r: (r["status"] != "finished", r.get("fid") or r.get("heldout_loss") or 1e30)):
        mark = " **(chosen)**" if r["trial"] == chosen["trial"] else ""
        cells = [" / ".join(map(_fmt, r.get(c) or [])) or "-" if c == "fid_by_seed" else _fmt(r.get(c)) for c in cols]
        lines.append("| " + " | ".join(cell + (mark if c == "trial" else "") for c, cell in zip(cols, cells)) + " |")
    failed = [r for r in rows if r.get("error")]
    if failed:
        lines += ["", "Failures:", ""] + [f"- {r['trial']}: {r['error']}" for r in failed]
    lines += ["", "![held-out loss of every trial](curves.png)", "",
              "Each trial's records (settings in `plan.json`; curve, outcome, stop or error in `trials/<trial>/`, "
              "all JSON) are what an interrupted sweep resumes from; Tune's own files are in `tune/` (`tune-2/`, ... "
              "for later starts). trials.csv and trials.json hold this table for scripts.", ""]
    path = sweep_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def write_sweeps_summary(sweeps_dir: Path, choices: list[dict[str, Any]]) -> Path:
    """Across rounds: the chosen learning rate and budget against the student's steps."""
    sweeps_dir.mkdir(parents=True, exist_ok=True)
    _write_csv(sweeps_dir / "choices.csv", choices)
    (sweeps_dir / "choices.json").write_text(json.dumps(choices, indent=2))
    plt = _pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(8.4, 3.4), dpi=110)
    steps = [c["student_steps"] for c in choices]
    a.plot(steps, [c["lr"] for c in choices], marker="o")
    a.set_ylabel("chosen learning rate")
    a.set_yscale("log")
    b.plot(steps, [c["updates"] for c in choices], marker="o", color="tab:orange")
    b.set_ylabel("chosen update budget")
    for ax in (a, b):
        ax.set_xscale("log", base=2)
        ax.invert_xaxis()
        ax.set_xlabel("student sampling steps")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(sweeps_dir / "choices.png")
    plt.close(fig)
    lines = ["# Tune sweeps: what each round chose", "",
             "| round | steps | chosen lr | chosen updates | other settings | trials | why | report |",
             "|---|---|---|---|---|---|---|---|"]
    for c in choices:
        settings = ", ".join(f"{k}={v}" for k, v in (c.get("settings") or {}).items()) or "-"
        lines.append(f"| {c['round']} | {c['teacher_steps']} -> {c['student_steps']} | {c['lr']:.3g} | {c['updates']} "
                     f"| {settings} | {c['trials']} | {c['reason']} | "
                     f"[round {c['round']}]({c['report'].removeprefix('sweeps/')}) |")
    lines += ["", "![chosen settings per round](choices.png)", ""]
    path = sweeps_dir / "summary.md"
    path.write_text("\n".join(lines))
    return path
