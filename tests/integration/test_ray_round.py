"""Rounds as Ray Train runs of DeepSpeed ZeRO-2 workers on CPU: a killed worker, resume, bad requests."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.planted import planted_torch_file


ROOT = Path(__file__).resolve().parents[2]
TINY = ["data.resolution=8", "model.attn_resolutions=[4]", "teacher.sampling_steps=4", "distill.start_steps=4",
        "eval.num_samples=16", "eval.grid_size=16", "eval.reference_samples=64", "eval.classifier_updates=20",
        "run.device=cpu", "data.loader_workers=0", "dist.workers=2", "dist.collective_timeout_s=120"]


def _workers(driver: int) -> list[int]:
    """This driver's Ray Train worker processes (its local Ray runs below it; other runs are left alone)."""
    import psutil

    try:
        family = psutil.Process(driver).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    return [p.pid for p in family if any("RayTrainWorker" in part for part in (p.cmdline() or []))]


def _kill_a_worker_after_a_checkpoint(run: Path, driver, stop: threading.Event, killed: list) -> None:
    while not stop.is_set():
        # the second checkpoint on disk means the first has been registered: that one must survive
        try:
            workers = _workers(driver.pid)
        except Exception:  # noqa: BLE001 - a process that ended while being listed
            workers = []
        if len(list((run / "ray" / "teacher").glob("checkpoint_*"))) >= 2 and workers:
            os.kill(workers[-1], signal.SIGKILL)  # a real process death, as a lost node would cause
            killed.append(workers[-1])
            return
        time.sleep(0.2)


def test_pipeline_on_ray_survives_a_killed_worker_and_reruns_as_a_no_op(tmp_path):
    args = TINY + ["teacher.updates=60", "distill.updates_per_round=4", "dist.checkpoint_every=6",
                   f"run.storage_path={tmp_path}", "run.name=r"]
    stop, killed = threading.Event(), []
    driver = subprocess.Popen([sys.executable, "-m", "raypd.distill", *args], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    watcher = threading.Thread(target=_kill_a_worker_after_a_checkpoint, args=(tmp_path / "r", driver, stop, killed))
    watcher.start()
    try:
        log, _ = driver.communicate(timeout=900)
    finally:
        stop.set()
        watcher.join()
    out = subprocess.CompletedProcess(driver.args, driver.returncode, log, "")
    (tmp_path / "log.txt").write_text(log)
    assert out.returncode == 0, log[-4000:]
    assert killed, "no worker was killed"
    assert "resumed from the checkpoint at update" in log  # not restarted from zero
    resumed_at = int(log.split("resumed from the checkpoint at update ")[1].split()[0])
    assert resumed_at >= 6
    for name in ("teacher", "round-00-2steps", "round-01-1steps"):
        assert (tmp_path / "r" / name / "model.safetensors").is_file()
    assert "report:" in out.stdout

    again = subprocess.run([sys.executable, "-m", "raypd.distill", *args], cwd=ROOT, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Ray Train run" not in again.stderr and "has finished already" in again.stderr


def test_more_gpus_than_exist_fail_before_training(tmp_path):
    out = subprocess.run([sys.executable, "-m", "raypd.distill", *TINY, "dist.use_gpu=true", "dist.workers=2",
                          f"run.storage_path={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert "cluster error: dist.workers=2 workers of {CPU: 1, GPU: 1} each do not fit: the cluster's nodes " \
           "can host 0; short of GPU (needs 2, the cluster has 0)" in out.stderr
    assert not (tmp_path / "local" / "teacher").exists()


def test_persistent_non_finite_updates_roll_back_then_stop_the_round_whose_doctored_checkpoints_are_refused(
        tmp_path):
    import torch

    from raypd.checkpoint import load_checkpoint, save_checkpoint
    from raypd.distill import main

    base = TINY + [f"run.storage_path={tmp_path}", "distill.updates_per_round=20", "teacher.updates=2",
                   "distill.start_steps=2", "teacher.sampling_steps=2"]
    assert main([*base, "dist.workers=0", "run.name=t"]) == 0
    teacher, meta = load_checkpoint(tmp_path / "t" / "teacher")
    with torch.no_grad():  # a teacher that outputs NaN: every distillation target is NaN, for real
        next(p for n, p in teacher.named_parameters() if n.endswith("conv_out.weight")).fill_(float("nan"))
    save_checkpoint(tmp_path / "nan-teacher", teacher, meta)
    out = subprocess.run([sys.executable, "-m", "raypd.distill", *base, "dist.workers=1", "run.name=n",
                          f"teacher.checkpoint={tmp_path / 'nan-teacher'}", "dist.checkpoint_every=2",
                          "dist.nonfinite_patience=3", "dist.max_rollbacks=1",
                          # the other tests here upload in the background, from the temporary folder
                          "dist.checkpoint_upload=sync", f"dist.staging_dir={tmp_path / 'fast-disk'}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    log = out.stdout + out.stderr
    (tmp_path / "log.txt").write_text(log)
    assert out.returncode == 2, log[-4000:]
    assert "3 non-finite updates in a row: rolled back to update 2, learning rate x0.5" in log
    assert "training error: round 0: the loss or gradients stayed non-finite (3 updates in a row) after 1 roll-backs" in log
    assert not (tmp_path / "n" / "round-00-1steps").exists()
    assert (tmp_path / "fast-disk" / "raypd-staging").is_dir()  # the checkpoints were staged there

    # the stopped round's DeepSpeed files, replaced by pickles that would create a file: resuming refuses them
    planted = tmp_path / "planted"
    files = sorted((tmp_path / "n" / "ray" / "round-00").glob("checkpoint_*/state/*.pt"))
    assert files
    for f in files:
        f.write_bytes(planted_torch_file(planted))
    again = subprocess.run(out.args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    log = again.stdout + again.stderr
    assert again.returncode == 2, log[-4000:]
    assert "checkpoint error: round 0: CheckpointError:" in log and "holds pickled io.open" in log, log[-4000:]
    assert "raypd refuses to unpickle it" in log
    assert not planted.exists()
