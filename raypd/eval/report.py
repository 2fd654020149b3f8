"""The run's report: summary.json for scripts, report.md and fid_vs_steps.png for people."""

from __future__ import annotations

import json
from pathlib import Path

from raypd.eval.protocol import describe

STYLES = {"teacher_ddim": ("o--", "teacher DDIM"), "teacher_stochastic": ("^:", "teacher stochastic"),
          "distilled": ("s-", "distilled")}


def plot_fid_vs_steps(rows: list[dict], full_steps: int, path: Path) -> Path:
    """The paper's Figure 4 for this run: FID against log2 sampling steps, one curve per sampler."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=100)
    n = standard_count(rows, full_steps)
    for sampler, (style, label) in STYLES.items():
        pts = sorted((r["steps"], r["fid"], r["n_samples"]) for r in rows if r["sampler"] == sampler)
        if pts:
            line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label)
            few = [p for p in pts if p[2] != n]  # fewer samples: drawn hollow
            if few:
                ax.plot([p[0] for p in few], [p[1] for p in few], style[0], mfc="white", color=line.get_color())
    full = [r["fid"] for r in rows if r["sampler"] == "teacher_ddim" and r["steps"] == full_steps]
    if full:
        ax.axhline(full[0], color="grey", lw=1, ls="-.", label=f"teacher, {full_steps} steps")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sampling steps")
    extractor = rows[0]["extractor"] if rows else ""
    fewer = sorted({r["n_samples"] for r in rows} - {n})
    ax.set_ylabel(f"FID ({extractor}, {n} samples" + (f"; hollow: {', '.join(map(str, fewer))}" if fewer else "")
                  + ")", fontsize=8)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def standard_count(rows: list[dict], full_steps: int) -> int:
    """The sample count of the run's standard points: the teacher's full sampler's."""
    full = [r["n_samples"] for r in rows if r["sampler"] == "teacher_ddim" and r["steps"] == full_steps]
    return full[0] if full else max((r["n_samples"] for r in rows), default=0)


def steps_table(rows: list[dict], rounds: list[dict], full_steps: int) -> list[str]:
    """FID, KID, RMSE (and label accuracy, when measured) of the teacher's DDIM and the students at every step
    count the rounds reach, for one set of rows (one guidance weight); a FID scored with fewer samples than the
    standard points is marked with its count."""
    by = {(r["sampler"], r["steps"]): r for r in rows}
    n = standard_count(rows, full_steps)

    def fid(row: dict) -> str:
        value = fmt(row.get("fid"), ".2f")
        return value if not row or row["n_samples"] == n else f"{value} (n={row['n_samples']:,})"
    accuracy = any("label_accuracy" in r for r in rows)
    head = ("| steps | distilled FID | teacher DDIM FID | distilled KID | teacher DDIM KID | distilled RMSE | "
            "teacher DDIM RMSE |" + (" distilled label acc. | teacher DDIM label acc. |" if accuracy else ""))
    lines = [head, "|---" * head.count(" |") + "|"]

    def acc(row: dict) -> str:
        return f" {fmt(row.get('label_accuracy'), '.3f')} |" if accuracy else ""

    full = by.get(("teacher_ddim", full_steps), {})
    lines.append(f"| {full_steps} (teacher) | - | {fmt(full.get('fid'), '.2f')} | - | {fmt(full.get('kid'), '.4f')} | "
                 f"- | 0 |" + (f" - |{acc(full)}" if accuracy else ""))
    for s in sorted({r["student_steps"] for r in rounds}, reverse=True):
        d, t = by.get(("distilled", s), {}), by.get(("teacher_ddim", s), {})
        lines.append(f"| {s} | {fid(d)} | {fid(t)} | {fmt(d.get('kid'), '.4f')} | "
                     f"{fmt(t.get('kid'), '.4f')} | {fmt(d.get('rmse_to_full'), '.4f')} | "
                     f"{fmt(t.get('rmse_to_full'), '.4f')} |{acc(d)}{acc(t)}")
    return lines


def gap_lines(rows: list[dict], rounds: list[dict], full_steps: int, teacher_compute: float | None) -> list[str]:
    """The paper's claim, read off the run: at each step count scored with the standard sample count, the share of
    the gap between the teacher's DDIM there and its full sampler that the student closes, in FID and in KID, with
    the distillation's compute so far against the teacher's training."""
    by = {(r["sampler"], r["steps"]): r for r in rows}
    full = by.get(("teacher_ddim", full_steps))
    lines = []
    for rnd in rounds:
        s = rnd["student_steps"]
        d, t = by.get(("distilled", s)), by.get(("teacher_ddim", s))
        if not (full and d and t) or not d["n_samples"] == t["n_samples"] == full["n_samples"]:
            continue
        shares = []
        for metric in ("fid", "kid"):
            if all(r.get(metric) is not None for r in (full, d, t)) and t[metric] > full[metric]:
                shares.append(f"{100 * (t[metric] - d[metric]) / (t[metric] - full[metric]):.1f}% in {metric.upper()}")
        if not shares:
            continue
        cost = (f", at {rnd['compute'] / teacher_compute:.2f}x the teacher's training compute"
                if teacher_compute and "compute" in rnd else "")
        lines.append(f"- {s} steps: the student closes {' and '.join(shares)} of the gap between the teacher's "
                     f"{s}-step DDIM and its {full_steps}-step sampler{cost}.")
    return [*lines, ""] if lines else []


def plot_fid_vs_guidance(rows: list[dict], full_steps: int, path: Path) -> Path:
    """FID against the guidance weight, one panel per step count: the teacher's full sampler, its DDIM and the
    student at that count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = sorted({r["steps"] for r in rows if r["sampler"] == "distilled"}, reverse=True)
    fig, axes = plt.subplots(1, max(1, len(counts)), figsize=(2.6 * max(1, len(counts)), 2.8), dpi=100,
                             sharey=True, squeeze=False)
    full = sorted((r["guidance"], r["fid"]) for r in rows if r["sampler"] == "teacher_ddim" and r["steps"] == full_steps)
    for ax, n in zip(axes[0], counts):
        if full:
            ax.plot(*zip(*full), "-", color="grey", label=f"teacher, {full_steps} steps")
        for sampler, (style, label) in STYLES.items():
            pts = sorted((r["guidance"], r["fid"]) for r in rows if r["sampler"] == sampler and r["steps"] == n)
            if pts:
                ax.plot(*zip(*pts), style, label=label)
        ax.set_title(f"{n} steps", fontsize=9)
        ax.set_xlabel("guidance weight w")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"FID ({rows[0]['extractor']})" if rows else "FID", fontsize=8)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def interruption_lines(record: dict | None) -> list[str]:
    """The report's account of what interrupted the run (nothing when nothing did)."""
    if not record:
        return []
    starts, stages, lost = record.get("driver_starts", 1), record.get("stages", []), record.get("lost_tasks", [])
    if starts <= 1 and not stages and not lost:
        return []
    lines = ["## Interruptions", "",
             f"The driver started {starts} time(s): {max(0, starts - 1)} interruption(s) of the driver. "
             f"{len(lost)} task(s) lost with their process or node ran again"
             + (f" ({', '.join(sorted(set(lost)))})." if lost else "."), ""]
    if stages:
        lines += ["| stage | resumed from updates | worker-group restarts | nodes lost | nodes preempted |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['stage']} | {', '.join(map(str, r['resumed_at'])) or '-'} | {r.get('worker_restarts', 0)} | "
                  f"{r['nodes_lost']} | {r['nodes_preempted']} |" for r in stages]
        lines.append("")
    return lines


def write_report(out: Path, summary: dict) -> Path:
    """summary.json, fid_vs_steps.png (a guided run's also fid_vs_guidance.png) and report.md in ``out``; returns
    the report's path."""
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    rows, full_steps = summary["eval"], summary["teacher"]["full_steps"]
    weights = sorted({r["guidance"] for r in rows if "guidance" in r})
    plot_fid_vs_steps([r for r in rows if r.get("guidance") == (weights[len(weights) // 2] if weights else None)],
                      full_steps, out / "fid_vs_steps.png")
    extractor = rows[0]["extractor"] if rows else "-"
    n = standard_count(rows, full_steps)
    fewer = ("" if all(r["n_samples"] == n for r in rows) else
             " (a point marked n=... was scored with fewer, from the first of the same noise: its FID reads higher "
             "than the others', its KID does not)")
    lines = ["# raypd run report", "",
             f"Run `{summary['run']}`, {summary['seconds']:.0f} s. Metrics: {extractor} features, {n} samples per "
             f"point{fewer}, noise seed {summary['eval_seed']}; RMSE is the distance to the teacher's {full_steps}-step "
             "samples from the same noise" + (" and guidance weight." if weights else "."), "",
             *([f"FID protocol: {describe(rows[0]['protocol'])}. The full record is in `summary.json` (each "
                "row's `protocol`); `raypd fid --checkpoint C --steps N --n "
                f"{n}` computes a row again.", ""] if rows and "protocol" in rows[0] else []),
             "![FID vs steps](fid_vs_steps.png)", ""]
    if not weights:
        lines += steps_table(rows, summary["rounds"], full_steps)
        lines += ["", *gap_lines(rows, summary["rounds"], full_steps, summary["teacher"].get("compute"))]
    else:
        plot_fid_vs_guidance(rows, full_steps, out / "fid_vs_guidance.png")
        lines += [f"Guided: every sampler is scored at each classifier-free guidance weight w ({', '.join(f'{w:g}' for w in weights)}); "
                  "the teacher combines its conditional and unconditional predictions, (1 + w) x(z, c) - w x(z), the "
                  "students take w as an input. `fid_vs_steps.png` is at the middle weight; label accuracy is the "
                  "share of samples the classifier reads as their label.", "",
                  "![FID vs guidance weight](fid_vs_guidance.png)", ""]
        for w in weights:
            lines += [f"### w = {w:g}", "", *steps_table([r for r in rows if r.get("guidance") == w], summary["rounds"],
                                                          full_steps), ""]
    teacher_cost = summary["teacher"].get("compute")
    about = summary.get("method_about")
    lines += ["", "## Rounds", "", *([about, ""] if about else []),
              "Compute is counted in forward-equivalents of the network per training example: 5 "
              "per distillation example (two teacher forwards, the student's forward and backward), 3 per teacher "
              "training example" + (f"; training the teacher cost {teacher_cost:,.0f}." if teacher_cost else
                                    " (the teacher's own training cost is not known: it was given or imported)."), "",
              "| round | steps | updates | lr | final loss | skipped samples | seconds | compute so far | x teacher | grid |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    middle = f"-w{weights[len(weights) // 2]:g}" if weights else ""
    for r in summary["rounds"]:
        grid = f"grids/distilled-{r['student_steps']:04d}steps{middle}.png"
        ratio = fmt(r["compute"] / teacher_cost if teacher_cost and "compute" in r else None, ".2f")
        steps = f"{r['teacher_steps']} -> {r['student_steps']}" + (f" ({r['phase']})" if r.get("phase") else "")
        lines.append(f"| {r['round']} | {steps} | {r['updates']} | {r['lr']:.2e} | "
                     f"{r['final_loss']:.4f} | {r.get('skipped_samples', 0)} | {r['wall_seconds']:.0f} | "
                     f"{fmt(r.get('compute'), ',.0f')} | {ratio} | {f'[grid]({grid})' if (out / grid).is_file() else '-'} |")
    lines += ["", f"Final student: `{summary['final_checkpoint']}`.", ""]
    lines += interruption_lines(summary.get("interruptions"))
    if summary.get("sweeps"):
        lines += ["## Tune sweeps", "", f"Every round was a Ray Tune sweep; the chosen settings per round and "
                  f"each round's trial table: [{summary['sweeps']}]({summary['sweeps']}).", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
