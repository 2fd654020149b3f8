"""Run storage in a bucket: the whole local pipeline against a local S3 server (moto's, on loopback), its
driver killed in the middle of a round and run again. Credentials reach it only through the environment."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.raycluster import free_port

ROOT = Path(__file__).resolve().parents[2]
KEY_ID, SECRET = "AKIARAYPDTESTKEY0001", "raypd-test-secret-9f3c2e7a"
RUN = ["data.resolution=8", "model.attn_resolutions=[4]", "teacher.updates=30", "teacher.sampling_steps=4",
       "distill.start_steps=4", "distill.updates_per_round=60", "dist.checkpoint_every=20", "eval.num_samples=16",
       "eval.grid_size=16", "eval.reference_samples=64", "eval.classifier_updates=20", "run.log_every=20",
       "run.device=cpu", "run.name=r"]


@pytest.fixture
def s3(tmp_path):
    moto_server = pytest.importorskip("moto.server")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=free_port())
    server.start()
    host, port = server.get_host_and_port()
    env = {**os.environ, "AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": KEY_ID,
           "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_REGION": "us-east-1", "TMPDIR": str(tmp_path / "tmp"),
           "PYTHONPATH": str(ROOT), "RAYPD_CACHE": str(tmp_path / "cache")}
    (tmp_path / "tmp").mkdir()
    from pyarrow import fs

    bucket = fs.S3FileSystem(endpoint_override=env["AWS_ENDPOINT_URL"], access_key=KEY_ID, secret_key=SECRET,
                             region="us-east-1", allow_bucket_creation=True)
    bucket.create_dir("raypd-test")
    try:
        yield env, bucket
    finally:
        server.stop()


def _keys(bucket, prefix: str) -> list[str]:
    from pyarrow import fs

    return [info.path[len(prefix) + 1:] for info in
            bucket.get_file_info(fs.FileSelector(prefix, recursive=True, allow_not_found=True))
            if info.type == fs.FileType.File]


def _objects(bucket, prefix: str) -> dict[str, bytes]:
    out = {}
    for key in _keys(bucket, prefix):
        with bucket.open_input_stream(f"{prefix}/{key}") as f:
            out[key] = f.read()
    return out


def test_the_local_pipeline_keeps_its_run_in_a_bucket_and_survives_a_killed_driver(s3, tmp_path):
    env, bucket = s3
    work = tmp_path / "cwd"
    work.mkdir()
    cmd = [sys.executable, "-m", "raypd.distill", *RUN, "--storage", "s3://raypd-test/runs"]
    log = tmp_path / "first.txt"
    began = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, cwd=work, stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        while proc.poll() is None:  # kill the driver once round 0 has a checkpoint in the bucket
            keys = _keys(bucket, "raypd-test/runs/r") if time.monotonic() - began > 5 else []
            if any(k.startswith("local/round-00/checkpoint_") and k.endswith("metrics.json") for k in keys):
                break
            time.sleep(0.3)
        assert proc.poll() is None, log.read_text()[-4000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    second = subprocess.run(cmd, env=env, cwd=work, capture_output=True, text=True, timeout=900)
    text = second.stdout + second.stderr
    (tmp_path / "second.txt").write_text(text)
    assert second.returncode == 0, text[-4000:]
    assert "[teacher] loading" in text and "[teacher] training" not in text  # the teacher was finished
    resumed = [line for line in text.splitlines() if line.startswith("[round 0] resumed from the checkpoint at update")]
    assert resumed, text[-4000:]
    assert "teacher_ddim at 4 steps: FID" in text and "(scored before" in text  # baselines kept in the bucket
    files = _objects(bucket, "raypd-test/runs/r")
    for name in ("config.json", "summary.json", "report.md", "fid_vs_steps.png", "teacher/meta.json",
                 "teacher/model.safetensors", "round-00-2steps/meta.json", "round-01-1steps/model.safetensors",
                 "grids/distilled-0001steps.png", "eval/record.json"):
        assert name in files, name
    assert "driver.lock" not in files  # the lease was released
    summary = json.loads(files["summary.json"])
    assert summary["final_checkpoint"] == "round-01-1steps"
    # nothing of the run on local disk outside the temporary directory; no credential in any file
    assert not any(work.iterdir())
    local = [p for p in tmp_path.rglob("*") if p.is_file()]
    for data in [*files.values(), *(p.read_bytes() for p in local if p.stat().st_size < 50_000_000)]:
        assert SECRET.encode() not in data and KEY_ID.encode() not in data
    print(f"{resumed[0]}; whole second run {json.loads(files['summary.json'])['seconds']:.0f} s")


def test_storage_uris_that_cannot_work_are_refused_up_front():
    from raypd.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="scheme 'hdfs' is not supported"):
        load_config(None, ["run.storage_path=hdfs://nn/runs"])
    with pytest.raises(ConfigError, match="carries credentials"):
        load_config(None, ["run.storage_path=s3://bucket/runs?access_key=A&secret_key=B"])
    with pytest.raises(ConfigError, match="names no bucket"):
        load_config(None, ["run.storage_path=s3:///runs"])
    assert load_config(None, ["run.storage_path=gs://bucket/runs"]).run.storage_path == "gs://bucket/runs"


RAY_RUN = ["data.resolution=8", "model.attn_resolutions=[4]", "teacher.updates=8", "teacher.sampling_steps=2",
           "distill.start_steps=2", "distill.updates_per_round=4", "dist.checkpoint_every=4", "eval.num_samples=16",
           "eval.grid_size=16", "eval.reference_samples=64", "eval.classifier_updates=20", "run.device=cpu",
           "data.loader_workers=0", "dist.workers=1", "dist.collective_timeout_s=120"]


def _ray_run(env: dict, args: list[str], cwd: Path) -> str:
    """The pipeline with its own local Ray (short temp dir: Ray's socket paths live under it); its log."""
    import shutil
    import tempfile

    ray_tmp = tempfile.mkdtemp(prefix="rayo", dir="/tmp")
    env = {**env, "RAY_TMPDIR": ray_tmp, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    try:
        out = subprocess.run([sys.executable, "-m", "raypd.distill", *args, "--storage", "s3://raypd-test/runs"],
                             env=env, cwd=cwd, capture_output=True, text=True, timeout=900)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    return text


def test_ray_train_workers_read_and_write_the_run_in_the_bucket(s3, tmp_path):
    """``dist.workers=1``: Ray Train keeps the stages' checkpoints in the bucket itself, and the workers fetch
    the teacher and the shards from it (nothing of the run is on a shared disk)."""
    env, bucket = s3
    _ray_run(env, [*RAY_RUN, "run.name=w"], tmp_path)
    keys = _keys(bucket, "raypd-test/runs/w")
    assert any(k.startswith("ray/teacher/checkpoint_") for k in keys)  # written by Ray Train to the bucket
    assert any(k.startswith("ray/round-00/checkpoint_") for k in keys)
    assert {"summary.json", "round-00-1steps/meta.json", "teacher/model.safetensors"} <= set(keys)
    fetched = {p.name for p in (tmp_path / "cache" / "fetch").glob("*/*/*")}
    assert "teacher" in fetched and any(name.endswith(".tar") for name in fetched)  # the workers' copies


def test_the_lease_keeps_a_second_driver_out_and_a_pull_skips_a_half_pushed_checkpoint(s3, tmp_path, monkeypatch):
    from raypd.storage import Bucket, BucketLock, StorageError

    env, _ = s3
    for key in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION"):
        monkeypatch.setenv(key, env[key])
    bucket = Bucket("s3://raypd-test/runs/lease")
    first = BucketLock(bucket, settle_s=0.1).acquire()
    with pytest.raises(StorageError, match="another driver is running on s3://raypd-test/runs/lease"):
        BucketLock(Bucket("s3://raypd-test/runs/lease"), settle_s=0.1).acquire()
    first.release()
    BucketLock(bucket, settle_s=0.1).acquire().release()
    # an expired lease (a driver on another host whose heartbeat stopped) is taken over
    bucket.write_bytes("driver.lock", json.dumps({"owner": "gone", "host": "elsewhere", "pid": 1,
                                                  "expires": time.time() - 1}).encode())
    BucketLock(bucket, settle_s=0.1).acquire().release()

    local = tmp_path / "mirror"
    (local / "local" / "round-00" / "checkpoint_00000020").mkdir(parents=True)
    (local / "local" / "round-00" / "checkpoint_00000020" / "engine.safetensors").write_bytes(b"weights")
    (local / "local" / "round-00" / "checkpoint_00000020" / "metrics.json").write_text("{}")
    (local / "config.json").write_text("{}")
    assert bucket.push(local) == 3 and bucket.push(local) == 0  # only what changed goes up
    bucket.write_bytes("local/round-00/checkpoint_00000040/engine.safetensors", b"cut off before its marker")
    again = tmp_path / "again"
    assert Bucket("s3://raypd-test/runs/lease").pull(again) == 3
    assert not (again / "local" / "round-00" / "checkpoint_00000040").exists()
    assert (again / "local" / "round-00" / "checkpoint_00000020" / "metrics.json").is_file()


def test_a_sweep_keeps_its_trials_in_the_bucket(s3, tmp_path):
    """Tune's experiment, the trials' Train runs, students, scores and start logs in the bucket; the round's
    report and tables in the run's mirror, pushed; the chosen trial's student promoted bit for bit."""
    env, bucket = s3
    _ray_run(env, [*RAY_RUN, "sweep.enabled=true", "sweep.lrs=[0.001,0.0003]", "sweep.grace_updates=4",
                   "sweep.report_every=2", "sweep.max_concurrent=1", "sweep.heldout_samples=16", "run.name=sw"],
             tmp_path)
    files = _objects(bucket, "raypd-test/runs/sw")
    table = json.loads(files["sweeps/round-00/trials.json"])
    assert {"sweeps/round-00/report.md", "sweeps/round-00/heldout.safetensors", "round-00-1steps/meta.json"} <= set(files)
    assert any(k.startswith("sweeps/round-00/tune/") for k in files)
    chosen = table["chosen"]
    assert json.loads(files[f"sweeps/round-00/trials/{chosen}/final.json"])["fid"] is not None
    assert files["round-00-1steps/model.safetensors"] == files[f"sweeps/round-00/trials/{chosen}/student/model.safetensors"]


def test_a_fetched_copy_follows_what_lies_at_its_address(s3, tmp_path, monkeypatch):
    """A run restarted under the same name writes a new teacher where the old one was: a node's cached copy of
    the old one must not be read for it."""
    from raypd.storage import Bucket, fetch

    env, _ = s3
    for key in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION"):
        monkeypatch.setenv(key, env[key])
    bucket = Bucket("s3://raypd-test/runs/again")
    bucket.write_bytes("teacher/model.safetensors", b"first weights")
    first = Path(fetch("s3://raypd-test/runs/again/teacher", tmp_path / "cache"))
    assert (first / "model.safetensors").read_bytes() == b"first weights"
    assert fetch("s3://raypd-test/runs/again/teacher", tmp_path / "cache") == str(first)  # once per version
    time.sleep(1.1)  # a new object time, as a rewrite some time later has
    bucket.write_bytes("teacher/model.safetensors", b"the restarted run's weights")
    second = Path(fetch("s3://raypd-test/runs/again/teacher", tmp_path / "cache"))
    assert second != first and (second / "model.safetensors").read_bytes() == b"the restarted run's weights"
