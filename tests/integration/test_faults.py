"""Faults made to happen for real: the driver killed mid-stage again and again (a soak), then run to
the end. Nothing finished is redone, interrupted stages resume from their checkpoints, and nothing
is left behind: no Ray processes, no staging files, no lock, no half-written checkpoints."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[2]
ARGS = ["data.resolution=8", "model.attn_resolutions=[4]", "teacher.sampling_steps=8", "distill.start_steps=8",
        "teacher.updates=24", "distill.updates_per_round=8", "distill.late_rounds_factor=1.0",
        "eval.num_samples=16", "eval.grid_size=16", "eval.reference_samples=64", "eval.classifier_updates=20",
        "run.device=cpu", "data.loader_workers=0", "dist.workers=1", "dist.checkpoint_every=4",
        "dist.collective_timeout_s=120"]
STAGES = ["teacher", "round-00-4steps", "round-01-2steps", "round-02-1steps"]


def _ray_processes() -> set[int]:
    names = ("raylet", "gcs_server", "RayTrainWorker", "TrainController", "ray::")
    found = set()
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if any(n in cmd for n in names) and p.pid != os.getpid():
            found.add(p.pid)
    return found


def _checkpoints(run: Path) -> int:
    return len(list((run / "ray").glob("*/checkpoint_*"))) + sum((run / s / "meta.json").is_file() for s in STAGES)


def test_driver_killed_again_and_again_loses_only_work_since_the_last_checkpoint(tmp_path):
    args = [*ARGS, f"run.storage_path={tmp_path}", "run.name=soak"]
    secret = "soak-secret-7Hq2vXb9"  # cloud credentials in the environment must never reach files or logs
    env = {**os.environ, "AWS_SECRET_ACCESS_KEY": secret, "GOOGLE_APPLICATION_CREDENTIALS_JSON": secret}
    run = tmp_path / "soak"
    before = _ray_processes()
    logs = []
    for cycle in range(2):
        seen = _checkpoints(run) if run.exists() else 0
        proc = subprocess.Popen([sys.executable, "-m", "raypd.distill", *args], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True, env=env)
        deadline = time.time() + 400
        while time.time() < deadline and proc.poll() is None and _checkpoints(run) <= seen:
            time.sleep(0.3)
        assert proc.poll() is None, f"cycle {cycle}: the run ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started, like a lost head node
        logs.append(proc.communicate()[0])
    done_before = {s: (run / s / "meta.json").stat().st_mtime for s in STAGES if (run / s / "meta.json").is_file()}

    final = subprocess.run([sys.executable, "-m", "raypd.distill", *args], cwd=ROOT, capture_output=True, text=True,
                           timeout=900, env=env)
    log = final.stdout + final.stderr
    (tmp_path / "log.txt").write_text("\n=====\n".join(logs + [log]))
    assert final.returncode == 0, log[-4000:]

    # finished stages were never redone; every interrupted one resumed from a checkpoint
    for stage, mtime in done_before.items():
        assert (run / stage / "meta.json").stat().st_mtime == mtime, stage
    resumed = [int(x.split()[0]) for x in ("\n".join(logs[1:]) + log).split("resumed from the checkpoint at update ")[1:]]
    assert resumed and all(u % 4 == 0 for u in resumed)  # at most checkpoint_every updates were lost
    summary = json.loads((run / "summary.json").read_text())
    assert [r["updates"] for r in summary["rounds"]] == [8, 8, 8]
    assert summary["final_checkpoint"] == "round-02-1steps"
    rss = [r["driver_rss_mib"] for r in summary["rounds"]]
    assert max(rss) <= rss[0] * 1.3 + 64, rss  # no growth round over round

    assert secret not in "".join(logs) + log
    for path in run.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".md", ".txt", ".csv", ".yaml", ".log"):
            assert secret not in path.read_text(errors="replace"), path

    # nothing left behind
    time.sleep(3)
    assert not (_ray_processes() - before), "Ray processes outlived the run"
    assert not (run / "driver.lock").exists()
    assert not [p for p in run.rglob("*") if p.name.endswith((".incoming", ".tmp")) or ".old" in p.name]
    for stage in ("teacher", "round-00", "round-01", "round-02"):
        key = hashlib.sha1(f"{(run / 'ray').resolve()}/{stage}".encode()).hexdigest()[:12]
        assert not (Path(tempfile.gettempdir()) / "raypd-staging" / f"{stage}-{key}").exists(), stage
