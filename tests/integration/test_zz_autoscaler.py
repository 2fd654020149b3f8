"""Against Ray's own autoscaler: a loopback cluster whose head runs the autoscaler on the ``fake_multinode``
provider (worker nodes are local processes), starting with no worker nodes. The node type offers a custom
resource standing in for a GPU (the fake provider's resources are logical), and the run's workers reserve it.
Only the processes the cluster started are stopped."""

import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.raycluster import TINY_RUN, Head, autoscaling_head

ROOT = Path(__file__).resolve().parents[2]
TINY = [*TINY_RUN, "dist.workers=2", "dist.resources_per_worker={CPU: 1, raypd_slot: 1}",
        "dist.collective_timeout_s=120"]


@pytest.fixture
def cluster():
    with autoscaling_head() as head:
        yield head


SLOW_S = 15
"""The slowed autoscaler's interval: a replacement node comes up well after ``START_S``."""
START_S = 3
"""Ray Train's worker-group start timeout in the driver's environment, standing in for its 60 s default against a
cloud's minutes: a stage that kept it could not wait for the replacement node."""


@pytest.fixture
def slow_cluster():
    with autoscaling_head(autoscaler_interval_s=SLOW_S) as head:
        yield head


def _env(head: Head, **extra: str) -> dict[str, str]:
    """A driver's environment on ``head``'s cluster, with ``extra`` variables."""
    return {**head.env, "RAY_ADDRESS": head.gcs_address, "PYTHONPATH": str(ROOT), **extra}


def _distill(head: Head, args: list[str], log: Path, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "raypd.distill", *args], env=_env(head, **env), cwd=ROOT,
                            stdout=log.open("w"), stderr=subprocess.STDOUT)


def _wait_until(check, timeout: float, what: str) -> float:
    began = time.monotonic()
    while not check():
        assert time.monotonic() - began < timeout, f"timed out waiting for {what}"
        time.sleep(0.5)
    return time.monotonic() - began


def _hosting_a_train_worker(head: Head) -> psutil.Process:
    """A worker node's raylet with a training worker among its children: killing an idle node would test nothing."""
    for raylet in head.node_raylets():
        with contextlib.suppress(psutil.Error):
            if any("RayTrainWorker" in " ".join(child.cmdline()) for child in raylet.children(recursive=True)):
                return raylet
    raise AssertionError(f"no worker node hosts a training worker: {head.node_raylets()}")


def test_scales_from_zero_then_lets_the_nodes_go(cluster, tmp_path):
    assert not cluster.node_raylets()  # no worker node: the run's request brings them up
    log = tmp_path / "log.txt"
    proc = _distill(cluster, [*TINY, "teacher.updates=8", "dist.checkpoint_every=4", f"run.storage_path={tmp_path}"],
                    log)
    assert proc.wait(timeout=900) == 0, log.read_text()[-5000:]
    text = log.read_text()
    assert "[cluster] waiting for nodes: 0 of 2 worker bundles {CPU: 1, raypd_slot: 1} placeable" in text
    waited = [line for line in text.splitlines() if "placeable after" in line]
    assert waited, text[-3000:]
    print(waited[0])  # the measured scale-up wait
    summary = json.loads((tmp_path / "local" / "summary.json").read_text())
    assert summary["final_checkpoint"] == "round-00-1steps"
    # the run withdrew its request: the idle nodes are removed (idle timeout 6 s)
    gone = _wait_until(lambda: not cluster.node_raylets(), 120, "the idle nodes to go")
    print(f"nodes removed {gone:.0f} s after the run ended")


def test_a_request_no_node_type_can_host_fails_fast(cluster, tmp_path):
    log = tmp_path / "log.txt"
    args = [*TINY, "teacher.updates=4", "dist.resources_per_worker={CPU: 1, raypd_slot: 2}",
            f"run.storage_path={tmp_path}"]
    began = time.monotonic()
    proc = _distill(cluster, args, log)
    assert proc.wait(timeout=300) == 2, log.read_text()[-5000:]
    text = log.read_text()
    assert "cluster error: the autoscaler adds no nodes for dist.workers=2 workers of {CPU: 1, raypd_slot: 2}" in text
    assert "raypd_slot (needs 4, the cluster has 0)" in text
    assert time.monotonic() - began < 150  # well before dist.scale_timeout_s (30 minutes)
    assert not (tmp_path / "local" / "teacher" / "meta.json").exists()
    assert not cluster.node_raylets()


def test_a_stage_waits_for_a_slow_replacement_of_a_lost_node(slow_cluster, tmp_path):
    """A worker node's raylet killed in the middle of teacher training (a node lost, as a spot preemption
    without notice looks to Ray), on a cluster whose autoscaler replaces it only after Ray Train's start timeout
    (``START_S`` here) has passed: the stage waits ``dist.node_wait_s`` instead, saying what it waits for, and the
    worker group restarts on the replacement node from the last checkpoint."""
    cluster = slow_cluster
    log = tmp_path / "log.txt"
    # the slowed autoscaler's first report takes a while: until then the cluster looks like one without an autoscaler
    probe = "from raypd.distributed.cluster import _autoscaler_status, connect; connect(); print(_autoscaler_status() is not None)"
    _wait_until(lambda: subprocess.run([sys.executable, "-c", probe], env=_env(cluster), cwd=ROOT, capture_output=True,
                                       text=True).stdout.strip().endswith("True"), 120, "the autoscaler's first report")
    proc = _distill(cluster, [*TINY, "teacher.updates=240", "dist.checkpoint_every=10", "dist.max_failures=3",
                              "dist.node_wait_s=300", f"run.storage_path={tmp_path}"], log,
                    RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S=str(START_S))
    try:
        checkpoints = tmp_path / "local" / "ray" / "teacher"
        _wait_until(lambda: any(checkpoints.glob("checkpoint_*/raypd_dist.json")) or proc.poll() is not None, 600,
                    "the teacher's first checkpoint")
        assert proc.poll() is None, log.read_text()[-5000:]
        victim = _hosting_a_train_worker(cluster)
        assert proc.poll() is None, "the stage ended before a node could be taken from it"
        killed = time.monotonic()
        victim.kill()
        back = _wait_until(lambda: "resumed from the checkpoint" in log.read_text() or proc.poll() is not None, 600,
                           "the stage to resume")
        assert proc.wait(timeout=900) == 0, log.read_text()[-5000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    resumed = [line for line in text.splitlines() if "[teacher] resumed from the checkpoint at update" in line]
    assert resumed, text[-5000:]
    assert "[teacher] the cluster lost node" in text
    assert "[teacher] lost node" in text and "waiting up to 300 s (dist.node_wait_s)" in text, text[-5000:]
    assert "[teacher] waiting for workers: 1 of 2 worker bundles {CPU: 1, raypd_slot: 1} placeable" in text
    placed = [line for line in text.splitlines() if "placeable again after" in line]
    assert placed and int(placed[0].split("after ")[1].split()[0]) > START_S, placed
    print(placed[0])
    meta = json.loads((tmp_path / "local" / "teacher" / "meta.json").read_text())
    # the node that held the teacher's worker, counted by the restarted worker group itself
    assert meta["metrics"]["nodes_lost"] >= 1 and meta["metrics"]["worker_restarts"] >= 1
    assert meta["metrics"]["updates"] == 240
    print(f"{resumed[0]}: {back:.0f} s after the node was killed; the run ended {time.monotonic() - killed:.0f} s "
          "after it")
