"""A round as a Ray Tune sweep of Ray Train trials: early stopping, choice, reports, resume after a killed driver."""

import csv
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.planted import Plant

ROOT = Path(__file__).resolve().parents[2]
BASE = ["data.resolution=8", "model.attn_resolutions=[4]", "teacher.sampling_steps=2", "distill.start_steps=2",
        "eval.num_samples=32", "eval.grid_size=16", "eval.reference_samples=64", "eval.classifier_updates=20",
        "run.device=cpu", "data.loader_workers=0", "dist.collective_timeout_s=120", "dist.zero_stage=2",
        "sweep.enabled=true", "sweep.lrs=[0.001,0.0003,10.0]", "sweep.grace_updates=4", "sweep.report_every=2",
        "sweep.max_concurrent=2", "sweep.heldout_samples=32", "distill.updates_per_round=12",
        "distill.late_rounds_factor=1.0", "distill.batch_size=32"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A small teacher trained in-process once, given to every sweep below."""
    from raypd.distill import main

    root = tmp_path_factory.mktemp("teacher")
    args = [*BASE, "sweep.enabled=false", "teacher.updates=40", "distill.updates_per_round=1",
            f"run.storage_path={root}", "run.name=t"]
    assert main(args) == 0
    return root / "t" / "teacher"


def _run(args, **kw):
    return subprocess.Popen([sys.executable, "-m", "raypd.distill", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True, **kw)


def _finish(args, tmp_path) -> str:
    """Run the driver to its end (its log kept beside the run) and require success; returns the log."""
    proc = _run(args)
    log, _ = proc.communicate(timeout=900)
    (tmp_path / "log.txt").write_text(log)
    assert proc.returncode == 0, log[-4000:]
    return log


def _trials(run, index: int = 0) -> dict:
    return json.loads((run / "sweeps" / f"round-{index:02d}" / "trials.json").read_text())


def test_sweep_stops_the_bad_lr_promotes_the_best_and_reports(tmp_path, teacher):
    args = [*BASE, "sweep.fid_seeds=2", f"teacher.checkpoint={teacher}", f"run.storage_path={tmp_path}", "run.name=s"]
    _finish(args, tmp_path)
    run = tmp_path / "s"
    table = _trials(run)
    rows = {r["lr"]: r for r in table["trials"]}
    assert sorted(rows) == [0.0003, 0.001, 10.0]
    assert rows[10.0]["status"] in ("stopped early", "failed", "diverged"), rows[10.0]
    assert rows[10.0]["updates_done"] < 12 or rows[10.0]["status"] != "stopped early"
    finished = [r for r in table["trials"] if r["status"] == "finished"]
    assert finished and all(r["fid"] is not None and r["updates_done"] == 12 for r in finished)
    # scored from two noise seeds (different noise, different FIDs) and chosen by their mean
    for r in finished:
        assert len(r["fid_by_seed"]) == 2 and r["fid_by_seed"][0] != r["fid_by_seed"][1], r
        assert r["fid"] == pytest.approx(sum(r["fid_by_seed"]) / 2)
    best = min(finished, key=lambda r: r["fid"])
    assert table["chosen"] == best["trial"] and best["lr"] != 10.0
    assert table["reason"].startswith("lowest mean FID over 2 noise seeds")
    # the promoted student is the chosen trial's, bit for bit
    promoted = (run / "round-00-1steps" / "model.safetensors").read_bytes()
    assert promoted == (run / "sweeps" / "round-00" / "trials" / best["trial"] / "student" / "model.safetensors").read_bytes()
    with open(run / "sweeps" / "round-00" / "trials.csv") as f:
        assert len(list(csv.DictReader(f))) == 3
    for name in ("sweeps/round-00/curves.png", "sweeps/choices.png"):
        assert (run / name).read_bytes()[:4] == b"\x89PNG", name
    report = (run / "sweeps" / "round-00" / "report.md").read_text()
    assert f"Chosen: **{best['trial']}**" in report and report.count("\n| ") == 4 and "| fid_by_seed |" in report
    summary = json.loads((run / "summary.json").read_text())
    assert summary["sweeps"] == "sweeps/summary.md" and summary["rounds"][0]["lr"] == best["lr"]
    # the round's compute counts every trial's updates, the stopped ones' too, not only the chosen trial's
    spent = sum(r["updates_done"] for r in table["trials"]) * 32
    assert summary["rounds"][0]["examples"] == spent and summary["rounds"][0]["compute"] == 5 * spent
    assert "Tune sweeps" in (run / "report.md").read_text()
    # raypd's own records of every trial: the plan, each curve, and ASHA's stop where it stopped one
    sweep = run / "sweeps" / "round-00"
    plan = json.loads((sweep / "plan.json").read_text())["trials"]
    assert sorted(t["lr"] for t in plan.values()) == [0.0003, 0.001, 10.0] and set(plan) == set(rows[lr]["trial"]
                                                                                               for lr in rows)
    for r in table["trials"]:
        history = json.loads((sweep / "trials" / r["trial"] / "history.json").read_text())
        assert max(map(int, history)) == r["updates_done"] or r["status"] == "failed", r
        assert (sweep / "trials" / r["trial"] / "stopped.json").is_file() == (r["status"] == "stopped early"), r
    # Tune's own results stay readable the Ray way
    from ray.tune import Tuner

    assert Tuner.can_restore(sweep / "tune")


def test_a_grid_crosses_learning_rates_budgets_and_choices(tmp_path, teacher):
    """``sweep.lrs`` with ``sweep.updates`` and ``sweep.choices``: one trial for every combination, each trained
    with its own budget and batch; the round's compute counts each trial's examples at its own batch, and the
    summary names the chosen batch."""
    from raypd.checkpoint import read_meta

    args = [*BASE, "sweep.lrs=[0.001]", "sweep.updates=[4,8]", "sweep.choices=[distill.batch_size=16|32]",
            "sweep.grace_updates=100", f"teacher.checkpoint={teacher}", f"run.storage_path={tmp_path}", "run.name=g"]
    _finish(args, tmp_path)
    run = tmp_path / "g"
    table = _trials(run)
    rows = table["trials"]
    assert sorted((r["updates"], r["distill.batch_size"]) for r in rows) == [(4, 16), (4, 32), (8, 16), (8, 32)]
    for r in rows:
        assert r["status"] == "finished" and r["updates_done"] == r["updates"] and r["fid"] is not None, r
        trained = read_meta(run / "sweeps" / "round-00" / "trials" / r["trial"] / "student").config
        assert trained["distill"]["batch_size"] == r["distill.batch_size"], r
    chosen = next(r for r in rows if r["trial"] == table["chosen"])
    assert chosen["fid"] == min(r["fid"] for r in rows)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rounds"][0]["examples"] == 4 * 16 + 4 * 32 + 8 * 16 + 8 * 32
    assert summary["rounds"][0]["updates"] == chosen["updates"]
    choices = json.loads((run / "sweeps" / "choices.json").read_text())
    assert choices[0]["settings"] == {"distill.batch_size": chosen["distill.batch_size"]}
    assert f"distill.batch_size={chosen['distill.batch_size']}" in (run / "sweeps" / "summary.md").read_text()


def test_a_random_search_at_equal_examples_draws_batches_and_budgets_together(tmp_path, teacher):
    """The search without a grid (``sweep.trials`` draws rates from ``lr_min..lr_max``), with ``sweep.examples``:
    each trial trains its drawn batch size for the examples' worth of updates; the first trial is the configured
    point (``distill.lr``, the first batch size)."""
    from raypd.checkpoint import read_meta

    args = [*BASE, "sweep.lrs=[]", "sweep.trials=3", "sweep.lr_min=1e-4", "sweep.lr_max=1e-3", "distill.lr=3e-4",
            "sweep.examples=192", "sweep.choices=[distill.batch_size=16|32]", "sweep.grace_updates=100",
            "sweep.seed=1", f"teacher.checkpoint={teacher}", f"run.storage_path={tmp_path}", "run.name=r"]
    run = tmp_path / "r"
    log = _finish(args, tmp_path)
    assert "Tune sweep: 3 trials, lr in [1.00e-04, 1.00e-03], updates in [12, 6]" in log
    rows = sorted(_trials(run)["trials"], key=lambda r: r["trial"].split("_")[-1])
    assert len(rows) == 3
    for r in rows:
        assert r["updates"] == 192 // r["distill.batch_size"], r
        assert r["status"] == "finished" and r["updates_done"] == r["updates"], r
        assert 1e-4 <= r["lr"] <= 1e-3, r
        trained = read_meta(run / "sweeps" / "round-00" / "trials" / r["trial"] / "student").config
        assert trained["distill"]["batch_size"] == r["distill.batch_size"] and trained["distill"]["lr"] == r["lr"]
    assert (rows[0]["lr"], rows[0]["distill.batch_size"], rows[0]["updates"]) == (3e-4, 16, 12)
    assert len({r["lr"] for r in rows}) == 3  # drawn, not repeated
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rounds"][0]["examples"] == 3 * 192  # equal compute: every trial the same examples


def test_a_killed_sweep_resumes_from_its_own_records_without_rerunning_finished_trials(tmp_path, teacher):
    """The driver killed while the second trial trains, with a finished trial behind it; Tune's pickled state then
    replaced by pickles that would create a file. The sweep resumes from raypd's JSON records: the finished trial
    is not rerun, the interrupted one continues from its Train checkpoint, Tune's pickles are never read."""
    args = [*BASE, "sweep.lrs=[0.001,0.0003,0.0001]", "sweep.max_concurrent=1", "distill.updates_per_round=8",
            "dist.checkpoint_every=2", f"teacher.checkpoint={teacher}", f"run.storage_path={tmp_path}", "run.name=k"]
    sweep = tmp_path / "k" / "sweeps" / "round-00"
    trials = sweep / "trials"
    proc = _run(args)
    deadline = time.time() + 600
    interrupted = None
    while time.time() < deadline and proc.poll() is None:
        done = {p.parent.name for p in trials.glob("*/final.json")}
        running = [p.name.removeprefix("trial-") for p in (sweep / "train").glob("trial-*")
                   if p.name.removeprefix("trial-") not in done and list(p.glob("checkpoint_*"))]
        if done and running:  # one trial finished, the next one has a checkpoint
            interrupted = running[0]
            break
        time.sleep(0.3)
    assert proc.poll() is None, "the sweep ended before it could be interrupted"
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started
    proc.wait()
    finished_before = {p.parent.name: p.stat().st_mtime for p in trials.glob("*/final.json")}
    assert finished_before and interrupted not in finished_before
    planted = tmp_path / "planted"
    doctored = list((sweep / "tune").rglob("*.pkl"))
    assert any(p.name == "tuner.pkl" for p in doctored)
    for p in doctored:
        p.write_bytes(pickle.dumps(Plant(planted)))

    log = _finish(args, tmp_path)
    assert "resuming the interrupted sweep from its records" in log
    assert not planted.exists()
    for trial, mtime in finished_before.items():
        assert (trials / trial / "starts.log").read_text().count("\n") == 1, trial  # trained once only
        assert (trials / trial / "final.json").stat().st_mtime == mtime
    assert (trials / interrupted / "starts.log").read_text().count("\n") == 2
    assert f"[trial-{interrupted}] Ray Train run" in log and "resumed from the checkpoint at update" in log
    table = _trials(tmp_path / "k")
    assert len(table["trials"]) == 3 and table["chosen"]
    assert {r["status"] for r in table["trials"]} <= {"finished", "stopped early"}, table["trials"]
    assert not list(trials.glob("*/error.json"))
    assert (sweep / "tune-2").is_dir()  # the second start's own Tune experiment


def test_a_tract_phase_sweeps_like_a_round(tmp_path, teacher):
    """A TRACT phase (2 teacher steps into 1: the self-teacher completes every target from t = 1) as a sweep:
    the trials report their held-out loss against their own self-teacher, and the best is promoted."""
    args = [*BASE, "sweep.lrs=[0.001,0.0003]", "distill.updates_per_round=6", "distill.method=tract",
            "distill.tract.phases=[1]", f"teacher.checkpoint={teacher}", f"run.storage_path={tmp_path}", "run.name=tr"]
    _finish(args, tmp_path)
    run = tmp_path / "tr"
    table = _trials(run)
    assert table["teacher_steps"] == 2 and table["student_steps"] == 1
    assert {r["status"] for r in table["trials"]} <= {"finished", "stopped early"}, table["trials"]
    assert all(0 < r["heldout_loss"] < 1e29 for r in table["trials"])
    best = min((r for r in table["trials"] if r["status"] == "finished"), key=lambda r: r["fid"])
    assert table["chosen"] == best["trial"]
    promoted = (run / "round-00-1steps" / "model.safetensors").read_bytes()
    assert promoted == (run / "sweeps" / "round-00" / "trials" / best["trial"] / "student" / "model.safetensors").read_bytes()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["method"] == "tract" and summary["rounds"][0]["lr"] == best["lr"]


@pytest.mark.parametrize("method", [["distill.method=consistency", "distill.consistency.target_ema=0.9"],
                                    ["distill.method=scd", "distill.scd.warmup_updates=3"]], ids=["cd", "scd"])
def test_the_consistency_methods_sweep_like_a_round(tmp_path, teacher, method):
    """Consistency distillation (its target network an average of each trial's student) and sCD (a second role,
    the adaptive weighting, its own DeepSpeed engine in every trial) as sweeps: each trial reports its held-out
    loss, and the best is promoted."""
    args = [*BASE, "sweep.lrs=[0.001,0.0003]", "distill.updates_per_round=6", *method,
            f"teacher.checkpoint={teacher}", f"run.storage_path={tmp_path}", "run.name=cm"]
    _finish(args, tmp_path)
    run = tmp_path / "cm"
    table = _trials(run)
    assert {r["status"] for r in table["trials"]} <= {"finished", "stopped early"}, table["trials"]
    assert all(0 < r["heldout_loss"] < 1e29 for r in table["trials"])
    chosen = next(r for r in table["trials"] if r["trial"] == table["chosen"])
    summary = json.loads((run / "summary.json").read_text())
    assert summary["method"] == method[0].split("=")[1] and summary["rounds"][0]["lr"] == chosen["lr"]
    assert any(r["sampler"] == "distilled" and r["fid"] > 0 for r in summary["eval"])


def test_guided_distillation_sweeps_its_first_stage_and_its_rounds(tmp_path):
    """A guided teacher (label dropout), then both stages as sweeps: the w-conditioned student's trials report
    held-out losses against the guided target at their own w, are scored at the middle weight, and the best of
    each is promoted."""
    from raypd.checkpoint import read_meta
    from raypd.distill import main

    guided = ["data.num_classes=10", "model.class_dropout=0.2"]
    assert main([*BASE, *guided, "sweep.enabled=false", "teacher.updates=40", "distill.updates_per_round=1",
                 f"run.storage_path={tmp_path}", "run.name=teacher"]) == 0
    args = [*BASE, *guided, "sweep.lrs=[0.001,0.0003]", "distill.updates_per_round=6", "distill.guidance_max=2",
            "distill.guidance_updates=6", "distill.guidance_lr=5e-5", "distill.lr=2e-4", "eval.guidance=[0,2]",
            f"teacher.checkpoint={tmp_path / 'teacher' / 'teacher'}",
            f"run.storage_path={tmp_path}", "run.name=guided"]
    _finish(args, tmp_path)
    run = tmp_path / "guided"
    for index, steps in ((0, (2, 2)), (1, (2, 1))):
        table = _trials(run, index)
        assert (table["teacher_steps"], table["student_steps"]) == steps
        assert {r["status"] for r in table["trials"]} <= {"finished", "stopped early"}, table["trials"]
        assert all(0 < r["heldout_loss"] < 1e29 for r in table["trials"])
        best = min((r for r in table["trials"] if r["status"] == "finished"), key=lambda r: r["fid"])
        assert table["chosen"] == best["trial"]
        # each trial trained at its learning rate: the first stage's own setting, then the rounds'
        key, other, kept = ("guidance_lr", "lr", 2e-4) if index == 0 else ("lr", "guidance_lr", 5e-5)
        for r in (r for r in table["trials"] if r["status"] == "finished"):  # a stopped trial keeps no student
            trained = read_meta(run / "sweeps" / f"round-{index:02d}" / "trials" / r["trial"] / "student").config
            assert trained["distill"][key] == r["lr"] and trained["distill"][other] == kept, (index, r)
    summary = json.loads((run / "summary.json").read_text())
    assert all(read_meta(run / r["checkpoint"]).guidance_input for r in summary["rounds"])
    assert {r["guidance"] for r in summary["eval"]} == {0.0, 2.0}
