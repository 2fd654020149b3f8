"""Ray clusters of a test's own on this machine: a head on loopback with its own temp dir and ports, optionally
with Ray's autoscaler on the ``fake_multinode`` provider (worker nodes launched as local processes). Only the
processes a cluster started are ever stopped; other Ray sessions on the machine are left alone."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import psutil

RAY = str(Path(sys.executable).with_name("ray"))
TINY_RUN = ["data.resolution=8", "model.attn_resolutions=[4]", "teacher.sampling_steps=2", "distill.start_steps=2",
            "distill.updates_per_round=4", "eval.num_samples=16", "eval.grid_size=16", "eval.reference_samples=64",
            "eval.classifier_updates=20", "run.device=cpu", "data.loader_workers=0"]
"""A run small enough for a test cluster's driver (add the dist settings)."""
DAEMONS = ("gcs_server", "raylet", "dashboard", "ray::", "default_worker", "log_monitor", "monitor.py",
           "runtime_env", "ray_client_server")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ray_processes(marker: str | None = None) -> set[int]:
    """Ray's daemons and workers now running (all of them, or those whose command line holds ``marker``)."""
    found = set()
    for p in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            cmd = " ".join(p.info["cmdline"] or [])
            if p.pid != os.getpid() and (marker in cmd if marker else any(n in cmd for n in DAEMONS)):
                found.add(p.pid)
    return found


def stop(pids: set[int]) -> None:
    """SIGTERM, then SIGKILL for what is left a few seconds later (a head's gcs_server ignores SIGTERM)."""
    procs = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            procs.append(psutil.Process(pid))
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=5)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(alive, timeout=5)


def cluster_env() -> dict[str, str]:
    """Environment for every process of a loopback test cluster, drivers included."""
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    return env


def fake_multinode_config(gcs_address: str, worker_types: dict, idle_timeout_minutes: float = 0.1) -> dict:
    """An autoscaling config for Ray's ``fake_multinode`` provider (the wheel does not ship its example)."""
    return {
        "cluster_name": "raypd-test", "max_workers": sum(t.get("max_workers", 0) for t in worker_types.values()),
        "provider": {"type": "fake_multinode", "gcs_address": gcs_address, "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True},
        "available_node_types": {"ray.head.default": {"resources": {}, "node_config": {}, "max_workers": 0},
                                 **worker_types},
        "head_node_type": "ray.head.default", "upscaling_speed": 1.0, "idle_timeout_minutes": idle_timeout_minutes,
        "docker": {}, "auth": {}, "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [], "setup_commands": [],
        "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


class Head:
    """``ray start --head`` on loopback; ``worker_types`` turns on the fake_multinode autoscaler."""

    def __init__(self, num_cpus: int = 2, worker_types: dict | None = None, resources: dict | None = None,
                 autoscaler_interval_s: float = 1):
        """``autoscaler_interval_s``: how often the autoscaler acts (a larger value stands in for a cloud's slow
        node boots)."""
        self.env = cluster_env()
        self.temp = tempfile.mkdtemp(prefix="rayt", dir="/tmp")  # short: Ray's socket paths live under it
        self.port, self.dashboard_port = free_port(), free_port()
        self.gcs_address = f"127.0.0.1:{self.port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.num_cpus, self.worker_types, self.resources = num_cpus, worker_types, resources
        self.pids: set[int] = set()
        self.autoscaler_interval_s = autoscaler_interval_s

    def start(self) -> Head:
        if shutil.which(RAY) is None:
            raise FileNotFoundError("the ray CLI is not installed beside this Python")
        # Ray 2.60 clusters use token auth: make sure this machine has a token (kept if it exists)
        subprocess.run([RAY, "get-auth-token", "--generate"], env=self.env, capture_output=True, timeout=60)
        cmd = [RAY, "start", "--head", f"--num-cpus={self.num_cpus}", "--node-ip-address=127.0.0.1",
               f"--port={self.port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
               f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
               f"--dashboard-agent-grpc-port={free_port()}", f"--temp-dir={self.temp}", "--disable-usage-stats"]
        env = dict(self.env)
        if self.resources:
            cmd.append(f"--resources={json.dumps(self.resources)}")
        if self.worker_types is not None:
            config = Path(self.temp) / "autoscaling.json"
            config.write_text(json.dumps(fake_multinode_config(self.gcs_address, self.worker_types)))
            env.update(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S=f"{self.autoscaler_interval_s:g}")
            cmd.append(f"--autoscaling-config={config}")
        before = ray_processes()
        started = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
        self.pids = ray_processes() - before
        if started.returncode != 0:
            self.stop()
            raise RuntimeError(f"ray start failed: {started.stderr[-3000:]}")
        return self

    def descendants(self) -> list[psutil.Process]:
        """Every live process this head started, the fake nodes' (children of its autoscaler monitor) included."""
        found: dict[int, psutil.Process] = {}
        for pid in set(self.pids) | ray_processes(self.temp):
            with contextlib.suppress(psutil.Error):
                proc = psutil.Process(pid)
                found[pid] = proc
                found.update({c.pid: c for c in proc.children(recursive=True)})
        return list(found.values())

    def node_raylets(self) -> list[psutil.Process]:
        """The raylets of the worker nodes the autoscaler launched (not the head's own)."""
        out = []
        for proc in self.descendants():
            with contextlib.suppress(psutil.Error):
                if proc.name() == "raylet" and proc.pid not in self.pids:
                    out.append(proc)
        return out

    def stop(self) -> None:
        """Stop what this head started: its processes, the fake nodes' (children of its monitor), its temp dir."""
        stop({p.pid for p in self.descendants()})
        shutil.rmtree(self.temp, ignore_errors=True)


SLOT = {"slot": {"resources": {"CPU": 1, "raypd_slot": 1}, "node_config": {}, "min_workers": 0, "max_workers": 3}}
"""A worker node type offering a custom resource that stands in for a GPU (the fake provider's resources are
logical); a run's workers reserve it with ``dist.resources_per_worker={CPU: 1, raypd_slot: 1}``."""


@contextlib.contextmanager
def autoscaling_head(num_cpus: int = 1, **kw) -> Iterator[Head]:
    """A started head with the fake_multinode autoscaler offering ``SLOT`` nodes, stopped on the way out; skips the
    test where the ray CLI is missing."""
    import pytest

    head = Head(num_cpus=num_cpus, worker_types=SLOT, **kw)
    try:
        head.start()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    try:
        yield head
    finally:
        head.stop()
