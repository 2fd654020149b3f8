"""The cluster a run needs: what each worker reserves, whether the nodes can host it, and, on an
autoscaling cluster, asking the autoscaler for it and waiting while nodes come up.

A run asks with Ray's ``request_resources`` for the whole of its workers' bundles (a sweep: its
concurrent trials' bundles) and holds that request until it ends, on success, error or interrupt, so
a cluster scaled from zero brings the nodes up for the run and lets them go when it is over. Where an
autoscaler publishes its node types' maxima (Ray's autoscaler v2, KubeRay) an impossible request is
refused at once; where it does not (the v1 autoscaler of ``ray up``), a request the autoscaler stops
adding nodes for while it is still short is refused once it has stalled.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from contextlib import contextmanager

from raypd.config import Config

STALL_S = 60.0
"""Seconds an autoscaler may add no node (none pending, none launching) while the request is short
before the request counts as one its node types cannot host. Longer than the 30 s after which Ray's v1
autoscaler gives up on a node it lost contact with (``AUTOSCALER_HEARTBEAT_TIMEOUT_S``) and replaces it: a
node type at its maximum with a dead node in it adds nothing until then."""
PROGRESS_S = 10.0


class ClusterError(RuntimeError):
    """The cluster cannot run what the config asks for; raised before any training."""


def worker_bundle(cfg: Config) -> dict[str, float]:
    """What one Ray Train worker reserves: ``dist.resources_per_worker`` (Ray Train's default when empty: one
    CPU, plus one GPU with use_gpu), and a sliver of the node's accelerator-type resource when one is asked for."""
    d = cfg.dist
    bundle = {k: float(v) for k, v in d.resources_per_worker.items()} or {"CPU": 1.0}
    if d.use_gpu and "GPU" not in bundle:
        bundle["GPU"] = 1.0
    if d.accelerator_type:
        bundle[f"accelerator_type:{d.accelerator_type}"] = 0.001
    return {k: v for k, v in bundle.items() if v > 0}


def scaling_config(cfg: Config):
    """Ray Train's ScalingConfig for the run's workers."""
    from ray.train import ScalingConfig

    d = cfg.dist
    return ScalingConfig(num_workers=d.workers, use_gpu=d.use_gpu,
                         resources_per_worker=dict(d.resources_per_worker) or None,
                         accelerator_type=d.accelerator_type or None)


def task_options(bundle: dict[str, float]) -> dict:
    """Ray task options reserving one worker's ``bundle`` (CPU, GPU and any custom resource)."""
    rest = {k: v for k, v in bundle.items() if k not in ("CPU", "GPU")}
    return {"num_cpus": bundle.get("CPU", 0), "num_gpus": bundle.get("GPU", 0), **({"resources": rest} if rest else {})}


def fits(resources: dict, bundle: dict[str, float]) -> int:
    """How many ``bundle``s one node offering ``resources`` hosts."""
    return int(min(resources.get(k, 0.0) // v for k, v in bundle.items() if v > 0))


def placeable_workers(nodes: list[dict], bundle: dict[str, float]) -> int:
    """How many worker bundles the alive nodes can host, each bundle on one node (a worker cannot span nodes)."""
    return sum(fits(n.get("Resources", {}), bundle) for n in nodes if n.get("Alive", n.get("alive", True)))


def sweep_trials(cfg: Config) -> int:
    """Trials a sweep wants to run at once: ``sweep.max_concurrent``, else every trial of a round."""
    return cfg.sweep.max_concurrent or cfg.sweep.trials_per_round()


def _autoscaler_config():
    """The node groups' resources and maxima an autoscaler publishes (v2, KubeRay); None when none does."""
    from ray._private.state import state

    try:
        config = state.get_cluster_config()
    except Exception:  # noqa: BLE001 - an older GCS without the key: no published maxima
        return None
    return config if config is not None and config.node_group_configs else None


def _autoscaler_status() -> dict | None:
    """The v1 autoscaler's last status report; None on a cluster without an autoscaler (a cluster started by
    ``ray start`` or ``ray.init()`` runs a read-only one, whose node types are its nodes' ids: not counted)."""
    from ray._private import ray_constants
    from ray.autoscaler._private.util import format_readonly_node_type
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
    status = json.loads(raw) if raw else None
    mapping = ((status or {}).get("autoscaler_report") or {}).get("node_type_mapping") or {}
    if not any(kind != format_readonly_node_type(node) for node, kind in mapping.items()):
        return None
    return status


def capacity(bundle: dict[str, float], nodes: list[dict], config=None) -> int | None:
    """Worker bundles the cluster can host at its largest: the head node plus every node group at its maximum
    count, where the autoscaler publishes them (``config``: its ClusterConfig, read when not given); None where
    it does not."""
    config = config if config is not None else _autoscaler_config()
    if config is None:
        return None
    total = sum(fits(n.get("Resources", {}), bundle) for n in nodes
                if n.get("Alive") and "node:__internal_head__" in n.get("Resources", {}))
    for group in config.node_group_configs:
        per_node = fits(dict(group.resources), bundle)
        if per_node:
            if group.max_count < 0:
                return sys.maxsize
            total += per_node * group.max_count
    return total


def _pending_nodes(status: dict | None) -> int:
    if not status:
        return 0
    report = status.get("autoscaler_report") or {}
    return len(report.get("pending_nodes") or []) + sum((report.get("pending_launches") or {}).values())


def _shortfall(bundle: dict[str, float], count: int) -> str:
    import ray

    have = ray.cluster_resources()
    short = [f"{k} (needs {v * count:g}, the cluster has {have.get(k, 0):g})" for k, v in bundle.items()
             if have.get(k, 0) < v * count]
    return ", ".join(short) or "room on single nodes (each worker's bundle must fit on one node)"


def _placing(have: int, need: int, bundle: dict[str, float], pending: int, waited: float, limit: float) -> str:
    """What a wait for worker bundles stands at (scaling up, or a worker group's restart after a node loss)."""
    return (f"{have} of {need} worker bundles {_fmt(bundle)} placeable, {pending} node(s) starting, "
            f"{waited:.0f} s of {limit:g} s")


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _fmt(bundle: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in bundle.items()) + "}"


def request_bundles(cfg: Config, trials: int = 1) -> list[dict[str, float]]:
    """What the run asks the autoscaler for: one bundle per worker of ``trials`` concurrent stages, and, where
    evaluation runs as Ray tasks whose shape (a CPU, and a GPU with use_gpu) no worker bundle holds, one such
    bundle per evaluation task."""
    d, bundle = cfg.dist, worker_bundle(cfg)
    workers = max(1, d.workers) if cfg.sweep.enabled else d.workers
    bundles = [bundle] * (workers * trials)
    evaluation = {"CPU": 1.0, **({"GPU": 1.0} if d.use_gpu else {})}
    if d.workers and cfg.eval.distributed and fits(bundle, evaluation) < 1:
        bundles += [evaluation] * d.workers
    return bundles


class ClusterRequest:
    """The run's standing request to the autoscaler; ``clear()`` withdraws it (safe to call twice)."""

    def __init__(self, bundles: list[dict[str, float]] | None):
        self.bundles, self.active = bundles or [], False
        if self.bundles:
            from ray.autoscaler.sdk import request_resources

            request_resources(bundles=self.bundles)
            self.active = True

    def clear(self) -> None:
        if self.active:
            import ray
            from ray.autoscaler.sdk import request_resources

            self.active = False
            if ray.is_initialized():
                request_resources(bundles=[])


class Cluster:
    """What the run found: whether an autoscaler runs, the bundles it can host at most (None: unknown), its
    standing request, and how many trials a sweep should run at once."""

    def __init__(self, cfg: Config, *, autoscaled: bool, most: int | None, request: ClusterRequest | None):
        self.cfg, self.autoscaled, self.most = cfg, autoscaled, most
        self.request = request or ClusterRequest(None)
        self.here = 0  # worker bundles the nodes up now can host

    def concurrent_trials(self) -> int:
        """Trials a sweep runs at once: the cluster's target (its maximum where known, the sweep's wish on an
        autoscaler that does not say), what the nodes up now hold where nothing scales."""
        import ray

        workers, want = max(1, self.cfg.dist.workers), sweep_trials(self.cfg)
        if self.cfg.sweep.max_concurrent:
            return self.cfg.sweep.max_concurrent
        if self.most is not None:
            return max(1, min(want, self.most // workers))
        if self.autoscaled:
            return want
        return max(1, min(want, placeable_workers(ray.nodes(), worker_bundle(self.cfg)) // workers))

    def release(self) -> None:
        self.request.clear()


def connect() -> None:
    """Connect to the running cluster (``ray job submit`` sets RAY_ADDRESS) or start a local one."""
    import ray

    if not ray.is_initialized():
        ray.init(log_to_driver=True, configure_logging=False)


def ensure_ray(cfg: Config, *, wait: bool = True, log=None) -> Cluster:
    """Connect, and check the cluster can host the run's workers (each worker's bundle on one node).

    Without an autoscaler, what is up now must host them. With one, the request is judged against the
    cluster's maximum where the autoscaler publishes it; ``wait`` then asks the autoscaler for the workers'
    bundles and waits (progress every few seconds) until they fit, ``dist.scale_timeout_s`` at most.
    """
    import ray

    connect()
    log = log or _stderr
    d, bundle = cfg.dist, worker_bundle(cfg)
    need = max(1, d.workers) if cfg.sweep.enabled else d.workers  # a local-mode sweep's trials run 1 worker each
    status = _autoscaler_status()
    most = capacity(bundle, ray.nodes())
    autoscaled = status is not None or most is not None
    here = placeable_workers(ray.nodes(), bundle)
    if most is not None and most < need:
        raise ClusterError(f"dist.workers={need} workers of {_fmt(bundle)} each do not fit: the cluster's node "
                           f"types can host {most} at their maximum node counts")
    if not autoscaled and here < need:
        raise ClusterError(f"dist.workers={need} workers of {_fmt(bundle)} each do not fit: the cluster's nodes can "
                           f"host {here}; short of {_shortfall(bundle, need)}")
    cluster = Cluster(cfg, autoscaled=autoscaled, most=most, request=None)
    cluster.here = here
    if not autoscaled or not wait:
        return cluster
    cluster.request = ClusterRequest(request_bundles(cfg, cluster.concurrent_trials() if cfg.sweep.enabled else 1))
    try:
        _wait_for(cfg, bundle, need, log)
    except BaseException:
        cluster.release()
        raise
    return cluster


def _wait_for(cfg: Config, bundle: dict[str, float], need: int, log) -> None:
    """Block until the alive nodes host ``need`` bundles; refuse when the autoscaler stalls or time runs out."""
    import ray

    began = last_log = time.monotonic()
    last_change, seen = began, None
    timeout = cfg.dist.scale_timeout_s
    while True:
        nodes = ray.nodes()
        have = placeable_workers(nodes, bundle)
        if have >= need:
            if seen is not None:
                log(f"[cluster] {have} of {need} worker bundles {_fmt(bundle)} placeable after "
                    f"{time.monotonic() - began:.0f} s")
            return
        pending = _pending_nodes(_autoscaler_status())
        now = time.monotonic()
        state = (have, pending, sum(1 for n in nodes if n.get("Alive")))
        if state != seen or pending:
            last_change = now
        if state != seen or now - last_log >= PROGRESS_S:
            log(f"[cluster] waiting for nodes: {_placing(have, need, bundle, pending, now - began, timeout)}")
            last_log, seen = now, state
        if now - began > timeout:
            raise ClusterError(f"dist.scale_timeout_s={timeout:g} passed: the nodes for dist.workers={need} workers "
                               f"of {_fmt(bundle)} never arrived ({have} placeable); short of "
                               f"{_shortfall(bundle, need)}")
        if not pending and now - last_change > STALL_S:
            raise ClusterError(f"the autoscaler adds no nodes for dist.workers={need} workers of {_fmt(bundle)} "
                               f"each: the cluster hosts {have} and nothing has been starting for {STALL_S:g} s, "
                               f"so its node types cannot host the rest; short of {_shortfall(bundle, need)}")
        time.sleep(1.0)


PREEMPTED, FAILED = "preempted", "lost"


def alive_nodes() -> set[str]:
    import ray

    return {n["NodeID"] for n in ray.nodes() if n.get("Alive")}


def node_losses(before: set[str]) -> list[tuple[str, str, str]]:
    """Nodes alive in ``before`` that have died since: (node id, "preempted" or "lost", Ray's message). Ray
    tells a preemption (an autoscaler draining a spot node it was told is going) from a node that failed or
    vanished; a node removed as idle is neither: the v2 autoscaler drains it as idle, the v1 autoscaler (``ray up``
    clusters, Ray's fake_multinode provider) records it as an expected termination "by autoscaler". The v1
    autoscaler records a node it lost contact with the same way when it terminates it before Ray's health check
    declares it dead, so this count is what the driver says while a stage runs, not the stage's record (the
    restarted worker group counts the nodes that held its workers: ``dead_nodes``)."""
    import ray

    found = []
    for node in ray.nodes():
        if node["NodeID"] not in before or node.get("Alive"):
            continue
        reason = int(node.get("DeathReason") or 0)
        message = node.get("DeathReasonMessage") or ""
        if reason == 4 or (reason == 1 and "by autoscaler" in message):  # AUTOSCALER_DRAIN_IDLE; v1's removal
            continue
        found.append((node["NodeID"], _death_kind(node), message or "no reason given"))
    return found


def dead_nodes(ids: list[str]) -> dict[str, str]:
    """Which of ``ids`` have died, and how ("preempted" or "lost"), whatever Ray says the reason was: asked about
    nodes that held a stage's workers, whose deaths cost the stage its workers."""
    import ray

    return {n["NodeID"]: _death_kind(n) for n in ray.nodes() if n["NodeID"] in ids and not n.get("Alive")}


def _death_kind(node: dict) -> str:
    """"preempted" where Ray says an autoscaler drained the node as preempted (reason 3), else "lost"."""
    return PREEMPTED if int(node.get("DeathReason") or 0) == 3 else FAILED


def describe_losses(losses: list[tuple[str, str, str]]) -> str:
    return "; ".join(f"node {node[:12]} {kind} ({message})" for node, kind, message in losses)


START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
"""Ray Train's limit on placing and starting a worker group; the driver's value reaches the run's controller."""


class NodeWatch:
    """While a stage runs: says when a node of the cluster is lost, then what the restarting worker group waits
    for (its worker bundles placeable on the alive nodes, nodes starting) until it can be placed again."""

    def __init__(self, name: str, cfg: Config, before: set[str], log=_stderr, every_s: float = 2.0):
        self.name, self.bundle, self.need = name, worker_bundle(cfg), cfg.dist.workers
        self.wait_s, self.before, self.log, self.every_s = cfg.dist.node_wait_s, before, log, every_s
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, name=f"raypd-nodes-{name}", daemon=True)

    def __enter__(self) -> "NodeWatch":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(timeout=10)

    def _watch(self) -> None:
        import ray

        seen: set[str] = set()
        waiting_since = last_log = None
        while not self.stop.wait(self.every_s):
            try:
                new = [loss for loss in node_losses(self.before) if loss[0] not in seen]
                nodes = ray.nodes()
            except Exception:  # noqa: BLE001 - the cluster is being torn down under the watch
                return
            now = time.monotonic()
            if new:
                seen.update(loss[0] for loss in new)
                self.log(f"[{self.name}] lost {describe_losses(new)}: the worker group restarts from its last "
                         f"checkpoint once its workers are placed again, waiting up to {self.wait_s:g} s "
                         "(dist.node_wait_s)")
                waiting_since = waiting_since or now
                last_log = None
            if waiting_since is None:
                continue
            have = placeable_workers(nodes, self.bundle)
            if have >= self.need:
                self.log(f"[{self.name}] {have} of {self.need} worker bundles {_fmt(self.bundle)} placeable again "
                         f"after {now - waiting_since:.0f} s")
                waiting_since = None
            elif last_log is None or now - last_log >= PROGRESS_S:
                pending = _pending_nodes(_autoscaler_status())
                self.log(f"[{self.name}] waiting for workers: "
                         f"{_placing(have, self.need, self.bundle, pending, now - waiting_since, self.wait_s)}")
                last_log = now


@contextmanager
def held(cfg: Config):
    """The cluster for a run: connected, checked, scaled up; the request withdrawn when the run ends (SIGTERM,
    as ``ray job stop`` sends it, ends the run like an interrupt so the request is withdrawn too)."""
    previous = None
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        try:
            previous = signal.signal(signal.SIGTERM, _terminate)
        except ValueError:  # not the main thread: leave signals alone
            previous = None
    cluster = None
    try:
        cluster = ensure_ray(cfg)
        yield cluster
    finally:
        if cluster is not None:
            cluster.release()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _terminate(signum, frame):
    raise SystemExit(128 + signum)


__all__ = ["Cluster", "ClusterError", "ClusterRequest", "capacity", "ensure_ray", "held", "placeable_workers",
           "scaling_config", "sweep_trials", "worker_bundle"]
