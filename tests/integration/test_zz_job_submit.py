"""``ray job submit -- python -m raypd.distill`` against a local head (``ray start --head``): the
stand-in for a real cluster, with a runtime environment. The head is the test's own (loopback, its own
temp dir and ports), and only the processes it started are stopped: other Ray sessions on the machine
are left alone."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.raycluster import RAY, TINY_RUN, Head

ROOT = Path(__file__).resolve().parents[2]
TINY = [*TINY_RUN, "teacher.updates=20", "dist.workers=1", "dist.checkpoint_every=2"]


@pytest.fixture
def head():
    """A Ray head of this test's own, on loopback, in its own temp dir and ports; only its processes are stopped."""
    cluster = Head(num_cpus=2)
    try:
        cluster.start()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    try:
        yield cluster.env, cluster.dashboard
    finally:
        cluster.stop()


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
