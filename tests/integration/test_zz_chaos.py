"""A chaos run: on a fake_multinode cluster, runs that hold every stage kind (teacher training, the Denoising
Student's pair tasks, a Tune sweep's trials, evaluation tasks, rounds of a method with two trained roles) are hit by
kills of their driver and of worker nodes at moments drawn from a seeded schedule, restarted after each driver
kill, and must end with the same weights as the same runs left alone, nothing half-written, and the report counting
what was lost.

Replay a schedule: ``RAYPD_CHAOS_SEED=<seed> RAYPD_CHAOS_KILLS=<kills per run> pytest -s tests/integration/test_zz_chaos.py``
(the test prints the schedule it drew and what each kill hit).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from tests.raycluster import Head, autoscaling_head

ROOT = Path(__file__).resolve().parents[2]
SEED = int(os.environ.get("RAYPD_CHAOS_SEED", "45"))
KILLS = int(os.environ.get("RAYPD_CHAOS_KILLS", "2"))
COMMON = ["data.resolution=8", "model.attn_resolutions=[4]", "run.device=cpu", "data.loader_workers=0",
          "eval.num_samples=16", "eval.grid_size=16", "eval.reference_samples=64", "eval.classifier_updates=20",
          "dist.workers=1", "dist.resources_per_worker={CPU: 1, raypd_slot: 1}", "dist.checkpoint_every=3",
          "dist.max_failures=6", "dist.collective_timeout_s=60", "dist.node_wait_s=120"]
TRIALS = 2
PAIRS_SWEEP = [*COMMON, "teacher.sampling_steps=4", "distill.start_steps=4", "teacher.updates=12",
               "distill.updates_per_round=12", "distill.method=denoising_student", "distill.denoising_student.pairs=1024",
               "sweep.enabled=true", "sweep.lrs=[0.001,0.0003]", "sweep.grace_updates=100", "sweep.report_every=3",
               f"sweep.max_concurrent={TRIALS}"]
"""Teacher training, the pairs' Ray tasks, a swept stage whose trials are Ray Train runs in Tune, evaluation tasks."""
TWO_ROLES = [*COMMON, "teacher.sampling_steps=2", "distill.start_steps=2", "distill.updates_per_round=12",
             "distill.method=critic_test", "distill.critic_test.every=2"]
"""A round of a method with a student and a critic, each its own DeepSpeed engine, then evaluation tasks."""


@dataclass(frozen=True)
class Kill:
    target: str  # "driver" or "node"
    phase: str  # what the run is doing when the kill is due: see PHASES
    delay_s: float  # after the phase is seen


def _any(run: Path, pattern: str) -> bool:
    return any(run.glob(pattern))


COMMITTED = "checkpoint_manager_snapshot.json"
"""Ray Train's record of a run's committed checkpoints, written once its first checkpoint is in."""
PHASES = {  # each true from the moment the phase began, in this start of the driver or an earlier one
    "teacher": lambda run, log: (run / "ray" / "teacher" / COMMITTED).exists()
    and not (run / "teacher" / "meta.json").exists(),
    "pairs": lambda run, log: "[pairs] teacher DDIM" in log or _any(run, "pairs/*"),
    # every trial running at once has a committed checkpoint: a worker killed now is one whose restart resumes
    "trials": lambda run, log: len(list(run.glob(f"sweeps/round-00/train/trial-*/{COMMITTED}"))) >= TRIALS,
    "round": lambda run, log: (run / "ray" / "round-00" / COMMITTED).exists(),
    "evaluation": lambda run, log: _any(run, "round-00-*/meta.json"),
}
RUNS = {"pairs-sweep": (PAIRS_SWEEP, ["teacher", "pairs", "trials", "evaluation"]),
        "two-roles": (TWO_ROLES, ["round", "evaluation"])}


def schedule(seed: int, kills: int) -> dict[str, list[Kill]]:
    """Each run's kills, in the order of its phases (distinct ones while there are enough): the first a driver
    kill, the second a node's, the rest drawn."""
    rng = random.Random(seed)
    out = {}
    for name, (_, phases) in RUNS.items():
        distinct = min(kills, len(phases))
        picked = sorted(rng.sample(range(len(phases)), k=distinct) + rng.choices(range(len(phases)), k=kills - distinct))
        out[name] = [Kill("driver" if i == 0 else "node" if i == 1 else rng.choice(["driver", "node"]),
                          phases[p], round(rng.uniform(0.0, 4.0), 1)) for i, p in enumerate(picked)]
    return out


BUSY = ("RayTrainWorker", "_sample_pairs", "_generate_and_extract", "_score", "_trial")
"""Ray workers doing the run's work (not idle ones kept for later tasks)."""


def _busy_raylet(head: Head) -> psutil.Process | None:
    """A worker node's raylet, one with a Ray worker doing something (a training worker, a task) if any."""
    raylets = head.node_raylets()
    for raylet in raylets:
        with contextlib.suppress(psutil.Error):
            if any(k in " ".join(c.cmdline()) for c in raylet.children(recursive=True) for k in BUSY):
                return raylet
    return raylets[0] if raylets else None


class Driver:
    """``raypd.distill`` (with the tests' two-role method registered) against the cluster, one process per start."""

    def __init__(self, head: Head, args: list[str], logs: Path):
        self.head, self.args, self.logs, self.starts = head, args, logs, 0
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.starts += 1
        env = {**self.head.env, "RAY_ADDRESS": self.head.gcs_address, "PYTHONPATH": str(ROOT)}
        self.log = self.logs.with_name(f"{self.logs.name}-{self.starts}.txt")
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.chaos_driver", *self.args], env=env, cwd=ROOT,
                                     stdout=self.log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def chaos(head: Head, args: list[str], run: Path, kills: list[Kill], logs: Path) -> list[str]:
    """The run to its end through ``kills``, restarting the driver after each driver kill; what each kill hit."""
    driver, hit = Driver(head, args, logs), []
    driver.start()
    pending = list(kills)
    while True:
        while pending and driver.proc.poll() is None:
            kill = pending[0]
            began = time.monotonic()
            while driver.proc.poll() is None and not PHASES[kill.phase](run, driver.text()):
                assert time.monotonic() - began < 600, f"{kill} never came due"
                time.sleep(0.2)
            time.sleep(kill.delay_s)
            if driver.proc.poll() is not None:
                break
            pending.pop(0)
            if kill.target == "driver":
                driver.kill()
                hit.append(f"{kill}: killed the driver (start {driver.starts})")
                break
            victim = _busy_raylet(head)
            if victim is None:
                hit.append(f"{kill}: no worker node was up")
                continue
            family = victim.children(recursive=True)
            children = sorted({k for c in family for k in BUSY if k in " ".join(c.cmdline())})
            for proc in [*family, victim]:  # everything on the node at once, as when its machine goes away
                with contextlib.suppress(psutil.Error):
                    proc.kill()
            hit.append(f"{kill}: killed a worker node running {children}")
        if driver.proc.poll() is None and not pending:
            assert driver.proc.wait(timeout=900) == 0, driver.text()[-5000:]
        if driver.proc.returncode == 0:
            break
        assert driver.proc.returncode == -signal.SIGKILL, driver.text()[-5000:]
        driver.start()
    hit += [f"{k}: not reached (the run had ended)" for k in pending]
    return hit


def _digest(path: Path) -> str:
    from raypd.checkpoint import weights_digest

    return weights_digest(path)


def _ours(run: Path, path: Path) -> bool:
    """A file raypd writes (not Ray Train's or Tune's own, under ``ray/`` and a sweep's ``train/`` and ``tune*/``)."""
    parts = path.relative_to(run).parts
    return parts[0] != "ray" and not (parts[0] == "sweeps" and len(parts) > 2 and parts[2].startswith(("train", "tune")))


def _check_nothing_half_written(run: Path) -> None:
    from raypd.checkpoint import verify_weights

    leftovers = [p for p in run.rglob("*") if p.name.endswith((".incoming", ".tmp")) or ".old" in p.name]
    assert not leftovers, leftovers
    for meta in run.rglob("meta.json"):
        if _ours(run, meta):
            verify_weights(meta.parent)  # every published checkpoint whole: its weights match its record
    for path in run.rglob("*.json"):
        if _ours(run, path):
            json.loads(path.read_text())
    assert not (run / "driver.lock").exists()


@pytest.fixture(scope="module")
def head():
    with autoscaling_head(num_cpus=0) as head:  # as a GPU cluster's head: the work goes to worker nodes
        yield head


def _run_alone(head: Head, args: list[str], logs: Path) -> None:
    driver = Driver(head, args, logs)
    driver.start()
    assert driver.proc.wait(timeout=900) == 0, driver.text()[-5000:]


def test_runs_hit_by_seeded_kills_of_drivers_and_nodes_end_as_the_same_runs_left_alone(head, tmp_path):
    plan = schedule(SEED, KILLS)
    print(f"chaos schedule (seed {SEED}, {KILLS} kills per run): {plan}")
    teacher = None
    for name, (args, _) in RUNS.items():
        args = [*args, *([f"teacher.checkpoint={teacher}"] if teacher else [])]
        alone, hit = tmp_path / "alone" / name, tmp_path / "chaos" / name
        _run_alone(head, [*args, f"run.storage_path={alone.parent}", f"run.name={name}"], tmp_path / f"{name}-alone")
        began = time.monotonic()
        what = chaos(head, [*args, f"run.storage_path={hit.parent}", f"run.name={name}"], hit, plan[name],
                     tmp_path / f"{name}-chaos")
        print(f"[{name}] {time.monotonic() - began:.0f} s through the kills:", *what, sep="\n  ")

        summary = json.loads((hit / "summary.json").read_text())
        final = hit / summary["final_checkpoint"]
        reference = json.loads((alone / "summary.json").read_text())
        assert summary["final_checkpoint"] == reference["final_checkpoint"]
        assert _digest(final) == _digest(alone / reference["final_checkpoint"]), f"{name}: the student differs"
        print(f"[{name}] final student {summary['final_checkpoint']}: weights digest {_digest(final)}")
        if (alone / "teacher" / "meta.json").is_file() and not teacher:
            assert _digest(hit / "teacher") == _digest(alone / "teacher")
        _check_nothing_half_written(hit)

        # the report counts what the run came through
        record = summary["interruptions"]
        driver_kills = sum("killed the driver" in w for w in what)
        assert record["driver_starts"] == driver_kills + 1, record
        busy = sum("killed a worker node running" in w and any(k in w for k in BUSY) for w in what)
        if busy:  # work lost with a node shows: a stage or trial resumed (or lost the node), or a task ran again
            assert record["stages"] or record["tasks_lost"], record
        for row in record["stages"]:  # a stage resumes from its checkpoints, never from its start
            assert all(u > 0 and u % 3 == 0 for u in row["resumed_at"]), row
        if driver_kills or record["stages"] or record["tasks_lost"]:
            assert "## Interruptions" in (hit / "report.md").read_text()
        assert reference["interruptions"] == {"driver_starts": 1, "tasks_lost": 0, "lost_tasks": [], "stages": []}
        print(f"[{name}] report: {record}")

        if name == "pairs-sweep":  # what a swept Denoising Student run gives
            assert "[pairs] wrote 1024 pairs" in "".join(p.read_text() for p in tmp_path.glob(f"{name}-*.txt"))
            assert summary["method"] == "denoising_student" and summary["pairs"]["count"] == 1024
            table = json.loads((hit / "sweeps" / "round-00" / "trials.json").read_text())
            assert {r["status"] for r in table["trials"]} == {"finished"}, table["trials"]
            assert all(0 < r["heldout_loss"] < 1e29 for r in table["trials"])
            chosen = next(r for r in table["trials"] if r["trial"] == table["chosen"])
            assert summary["rounds"][0]["lr"] == chosen["lr"]
            teacher = alone / "teacher"

    again = Driver(head, [*RUNS["two-roles"][0], f"teacher.checkpoint={teacher}", f"run.storage_path={hit.parent}",
                          "run.name=two-roles"], tmp_path / "again")
    again.start()
    assert again.proc.wait(timeout=300) == 0
    assert "has finished already" in again.text() and "Ray Train run" not in again.text()
