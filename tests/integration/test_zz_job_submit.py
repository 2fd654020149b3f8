"""``ray job submit -- python -m raypd.distill`` against a local head (``ray start --head``): the
stand-in for a real cluster, with a runtime environment. Runs last: it owns the machine's Ray head."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))
TINY = ["data.resolution=8", "model.attn_resolutions=[4]", "teacher.updates=20", "teacher.sampling_steps=2",
        "distill.start_steps=2", "distill.updates_per_round=4", "eval.num_samples=16", "eval.grid_size=16",
        "eval.reference_samples=64", "eval.classifier_updates=20", "run.device=cpu", "data.loader_workers=0",
        "dist.workers=1", "dist.checkpoint_every=2"]


@pytest.fixture
def head(tmp_path):
    if shutil.which(RAY) is None:
        pytest.skip("the ray CLI is not installed beside this Python")
    env = {**os.environ, "RAY_AUTH_MODE": "token",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    subprocess.run([RAY, "stop", "--force"], capture_output=True, timeout=120)
    # Ray 2.60 clusters use token auth: make sure this machine has a token (kept if it exists)
    subprocess.run([RAY, "get-auth-token", "--generate"], env=env, capture_output=True, timeout=60)
    started = subprocess.run([RAY, "start", "--head", "--num-cpus=2", "--dashboard-host=127.0.0.1",
                              "--disable-usage-stats"], env=env, capture_output=True, text=True, timeout=180)
    assert started.returncode == 0, started.stderr[-3000:]
    try:
        yield env
    finally:
        subprocess.run([RAY, "stop", "--force"], capture_output=True, timeout=120)


def test_job_submit_runs_the_pipeline_with_a_runtime_env(head, tmp_path):
    runtime_env = {"env_vars": {"RAYPD_JOB_MARK": "from-runtime-env"}}
    cmd = [RAY, "job", "submit", "--address", "http://127.0.0.1:8265", "--working-dir", str(ROOT),
           "--runtime-env-json", json.dumps(runtime_env), "--",
           sys.executable, "-c", "import os, sys; from raypd.distill import main; "
           "print('mark', os.environ.get('RAYPD_JOB_MARK')); sys.exit(main(sys.argv[1:]))",
           *TINY, f"run.storage_path={tmp_path}"]
    out = subprocess.run(cmd, env=head, capture_output=True, text=True, timeout=900)
    log = out.stdout + out.stderr
    (tmp_path / "log.txt").write_text(log)
    assert out.returncode == 0 and "succeeded" in log, log[-4000:]
    assert "mark from-runtime-env" in log  # the runtime env reached the job's driver
    assert "Ray Train run on 1 worker(s)" in log
    run = tmp_path / "local"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final_checkpoint"] == "round-00-1steps"
    assert (run / "round-00-1steps" / "model.safetensors").is_file() and (run / "report.md").is_file()
