"""``ray job submit -- python -m raypd.distill`` against a local head (``ray start --head``): the
stand-in for a real cluster, with a runtime environment. The head is the test's own (loopback, its own
temp dir and ports), and only the processes it started are stopped: other Ray sessions on the machine
are left alone."""

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))
TINY = ["data.resolution=8", "model.attn_resolutions=[4]", "teacher.updates=20", "teacher.sampling_steps=2",
        "distill.start_steps=2", "distill.updates_per_round=4", "eval.num_samples=16", "eval.grid_size=16",
        "eval.reference_samples=64", "eval.classifier_updates=20", "run.device=cpu", "data.loader_workers=0",
        "dist.workers=1", "dist.checkpoint_every=2"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ray_processes(marker: str | None = None) -> set[int]:
    """Ray's daemons and workers now running (all of them, or those whose command line holds ``marker``)."""
    names = ("gcs_server", "raylet", "dashboard", "ray::", "default_worker", "log_monitor", "monitor.py",
             "runtime_env", "ray_client_server")
    found = set()
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if p.pid != os.getpid() and (marker in cmd if marker else any(n in cmd for n in names)):
            found.add(p.pid)
    return found


def _stop(pids: set[int]) -> None:
    """SIGTERM, then SIGKILL for what is left a few seconds later (a head's gcs_server ignores SIGTERM)."""
    procs = []
    for pid in pids:
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            continue
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=5)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(alive, timeout=5)


@pytest.fixture
def head():
    """A Ray head of this test's own, on loopback, in its own temp dir and ports; only its processes are stopped."""
    if shutil.which(RAY) is None:
        pytest.skip("the ray CLI is not installed beside this Python")
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    temp = tempfile.mkdtemp(prefix="rayjs", dir="/tmp")  # short: Ray's socket paths live under it
    dashboard = _free_port()
    # Ray 2.60 clusters use token auth: make sure this machine has a token (kept if it exists)
    subprocess.run([RAY, "get-auth-token", "--generate"], env=env, capture_output=True, timeout=60)
    before = _ray_processes()
    started = subprocess.run([RAY, "start", "--head", "--num-cpus=2", "--node-ip-address=127.0.0.1",
                              f"--port={_free_port()}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                              f"--ray-client-server-port={_free_port()}", f"--dashboard-agent-listen-port={_free_port()}",
                              f"--dashboard-agent-grpc-port={_free_port()}", f"--temp-dir={temp}",
                              "--disable-usage-stats"], env=env, capture_output=True, text=True, timeout=180)
    ours = _ray_processes() - before
    try:
        assert started.returncode == 0, started.stderr[-3000:]
        yield env, f"http://127.0.0.1:{dashboard}"
    finally:
        _stop(ours | _ray_processes(temp))
        shutil.rmtree(temp, ignore_errors=True)


def test_job_submit_runs_the_pipeline_with_a_runtime_env(head, tmp_path):
    env, address = head
    runtime_env = {"env_vars": {"RAYPD_JOB_MARK": "from-runtime-env"}}
    cmd = [RAY, "job", "submit", "--address", address, "--working-dir", str(ROOT),
           "--runtime-env-json", json.dumps(runtime_env), "--",
           sys.executable, "-c", "import os, sys; from raypd.distill import main; "
           "print('mark', os.environ.get('RAYPD_JOB_MARK')); sys.exit(main(sys.argv[1:]))",
           *TINY, f"run.storage_path={tmp_path}"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    log = out.stdout + out.stderr
    (tmp_path / "log.txt").write_text(log)
    assert out.returncode == 0 and "succeeded" in log, log[-4000:]
    assert "mark from-runtime-env" in log  # the runtime env reached the job's driver
    assert "Ray Train run on 1 worker(s)" in log
    run = tmp_path / "local"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final_checkpoint"] == "round-00-1steps"
    assert (run / "round-00-1steps" / "model.safetensors").is_file() and (run / "report.md").is_file()
