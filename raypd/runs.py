"""The run directory: one driver at a time, resume or restart, and a guard against mixing runs.

A run's state is its directory (``run.storage_path/run.name``): the config it was started with
(``config.json``), finished stages as checkpoints, the Ray Train runs of unfinished ones. Running
the same command again continues it. Three things keep that safe:

- a lock (``driver.lock``) held by the running driver and refreshed by a heartbeat, so a second
  driver on the same directory refuses to start, while the lock of a driver that died (its pid is
  gone on this host, or its heartbeat stopped) is taken over with a warning;
- the saved config: continuing with settings that change what was trained (model, data, schedule,
  teacher, rounds) is refused, naming the keys, because the finished checkpoints would no longer
  match the config;
- ``--restart`` never deletes: it moves the old directory aside under a dated name.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from raypd.config import Config, migrate, redact
from raypd.storage import pid_alive

LOCK = "driver.lock"
CONFIG = "config.json"
HEARTBEAT_S = 15.0
STALE_AFTER_S = 120.0

# Settings that may change between a run and its continuation: how it is evaluated, logged and
# spread over workers, not what it trains.
MUTABLE_SECTIONS = ("eval", "dist", "sweep")
MUTABLE_KEYS = ("run.log_every", "run.device", "run.storage_path", "data.loader_workers", "data.shuffle_buffer")


class RunStateError(RuntimeError):
    """The run directory cannot be used as asked (locked, different config, nothing to resume)."""


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: data}


def changed_keys(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ and that a continued run must keep. A setting the saved config does not
    have (added to raypd after the run started) counts as changed only when it is off its default."""
    a, b = _flat(saved), _flat(current)
    defaults = _flat(Config().to_dict())
    keys = sorted(set(a) | set(b))
    return [k for k in keys if a.get(k) != b.get(k) and k.split(".")[0] not in MUTABLE_SECTIONS
            and k not in MUTABLE_KEYS and not (k not in a and k in defaults and b.get(k) == defaults[k])]


def has_state(out: Path) -> bool:
    return (out / CONFIG).is_file()


RAY_JOB_COPY = "runtime_resources/working_dir_files"
"""Part of the path of the per-job copy of the working directory that ``ray job submit --working-dir`` runs in."""


def check_storage_path(storage_path: str, cwd: str | None = None) -> None:
    """Refuse a relative storage path inside a Ray job's copy of its working directory.

    That copy is made anew for every submission (under a content hash), so a run written relative to
    it would never be found again by a resubmitted job: resume after a failure would start over.
    """
    cwd = cwd if cwd is not None else os.getcwd()
    if not Path(storage_path).is_absolute() and RAY_JOB_COPY in Path(cwd).as_posix():
        raise RunStateError(f"run.storage_path={storage_path!r} is relative, and this job runs in Ray's per-job copy "
                            f"of its working directory ({cwd}): a resubmitted job would not find the run. Give a "
                            "bucket (--storage s3://bucket/raypd-runs) or an absolute path on storage every node shares")


def run_uri(cfg: Config) -> str | None:
    """The run's folder in a bucket, when ``run.storage_path`` is an object-store URI."""
    from raypd.storage import is_uri, join

    return join(cfg.run.storage_path, cfg.run.name) if is_uri(cfg.run.storage_path) else None


def run_dir(cfg: Config) -> Path:
    """The run's directory, absolute (Ray workers and Tune trials do not share the driver's working directory);
    for a run in a bucket, the driver's local mirror of it."""
    uri = run_uri(cfg)
    if uri is not None:
        from raypd.storage import mirror_dir

        return mirror_dir(uri)
    check_storage_path(cfg.run.storage_path)
    return (Path(cfg.run.storage_path) / cfg.run.name).resolve()


@contextmanager
def open_run(cfg: Config, *, restart: bool = False) -> Iterator[tuple[Path, Any]]:
    """The run's directory for one driver: locked (a lock file, or a lease object in the bucket), moved aside
    first with ``restart``; for a run in a bucket, a mirror pulled now and pushed as it changes (yielded second;
    None for a directory)."""
    uri = run_uri(cfg)
    if uri is None:
        out = run_dir(cfg)
        if restart:
            archive_run(out)
        with DriverLock(out):
            yield out, None
        return
    from raypd.storage import Bucket, BucketLock, Mirror, mirror_dir

    bucket = Bucket(uri)
    with BucketLock(bucket):
        if restart:
            aside = bucket.move_aside(keep=BucketLock.NAME)
            if aside:
                print(f"[raypd] --restart: moved the previous run to {aside} (nothing was deleted)", file=sys.stderr)
        mirror = Mirror(bucket, mirror_dir(uri)).open()
        failed = True
        try:
            yield mirror.local, mirror
            failed = False
        finally:
            try:
                mirror.close()
            except Exception as err:  # noqa: BLE001 - do not hide the run's own error behind the push's
                if not failed:
                    raise
                print(f"[storage] the last push to {uri} failed: {err}", file=sys.stderr)


def archive_run(out: Path) -> Path | None:
    """``--restart``: move an existing run aside under a dated name (nothing is deleted)."""
    if not out.exists():
        return None
    check_unlocked(out)
    archived = out.with_name(f"{out.name}.{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}")
    os.replace(out, archived)
    print(f"[raypd] --restart: moved the previous run to {archived} (nothing was deleted)", file=sys.stderr)
    return archived


def check_and_save_config(cfg: Config, out: Path, *, resume: bool = False) -> None:
    """Refuse to continue a run under settings that change what it trains; then save the config.

    ``resume``: there must be a run to continue (``--resume``).
    """
    if resume and not has_state(out):
        raise RunStateError(f"--resume: {out} holds no run to resume (no {CONFIG}); "
                            "check run.storage_path / run.name, or drop --resume to start one")
    if has_state(out):
        saved = _flat(migrate(json.loads((out / CONFIG).read_text())))
        current = _flat(redact(cfg.to_dict()))
        diffs = changed_keys(saved, current)
        if diffs:
            shown = ", ".join(f"{k} ({saved.get(k)!r} -> {current.get(k)!r})" for k in diffs[:8])
            raise RunStateError(
                f"{out} holds a run started with different settings: {shown}"
                f"{' ...' if len(diffs) > 8 else ''}. Continuing would mix its finished checkpoints with "
                "the new settings; use another run.name, or --restart to move the old run aside")
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{CONFIG}.tmp"
    tmp.write_text(json.dumps(redact(cfg.to_dict()), indent=2))
    os.replace(tmp, out / CONFIG)


def finished_summary(out: Path) -> dict[str, Any] | None:
    """The summary of a run whose every stage and report are done, else None."""
    try:
        summary = json.loads((out / "summary.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    final = summary.get("final_checkpoint")
    if not isinstance(final, str) or Path(final).name != final or final in (".", ".."):
        return None  # only a checkpoint directly inside the run counts
    if (out / final / "meta.json").is_file() and (out / "report.md").is_file():
        return summary
    return None


# ---- what interrupted the run -------------------------------------------------------------

EVENTS = "interruptions.jsonl"
"""One JSON line per start of the run's driver and per lost task that ran again: read back into the summary."""


def record_event(out: Path, kind: str, **fields: Any) -> None:
    """Append one event (``start``, ``task lost``) to the run's record of interruptions."""
    with open(out / EVENTS, "a") as f:
        f.write(json.dumps({"event": kind, "time": round(time.time(), 1), **fields}) + "\n")
        f.flush()


def interruptions(out: Path, stages: list[Path]) -> dict[str, Any]:
    """What the run came through: its driver's starts, the tasks lost and run again, and for each of ``stages``
    (finished checkpoints) and each sweep trial, the updates it resumed from, the restarts of its worker group after
    a failure, and the nodes that held its workers and were lost."""
    events = []
    if (out / EVENTS).is_file():
        for line in (out / EVENTS).read_text().splitlines():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by a killed driver
    trials = sorted(p / "student" for p in out.glob("sweeps/*/trials/*") if (p / "student" / "meta.json").is_file())
    rows = []
    for path in [*stages, *trials]:
        metrics = json.loads((path / "meta.json").read_text()).get("metrics", {})
        if "sweep_report" in metrics:
            continue  # a swept round's student is its chosen trial's, counted with the trials
        row = {"stage": str(path.relative_to(out)), "resumed_at": list(metrics.get("resumed_at", [])),
               "worker_restarts": int(metrics.get("worker_restarts", 0)),
               "nodes_lost": int(metrics.get("nodes_lost", 0)), "nodes_preempted": int(metrics.get("nodes_preempted", 0))}
        if row["resumed_at"] or row["worker_restarts"] or row["nodes_lost"] or row["nodes_preempted"]:
            rows.append(row)
    lost = [e.get("what", "?") for e in events if e.get("event") == "task lost"]
    return {"driver_starts": sum(e.get("event") == "start" for e in events), "tasks_lost": len(lost),
            "lost_tasks": lost, "stages": rows}


# ---- the driver lock -------------------------------------------------------------------------


def lock_holder(out: Path) -> dict[str, Any] | None:
    """The live driver holding ``out``, or None when the lock is absent or stale."""
    path = out / LOCK
    try:
        info = json.loads(path.read_text())
        age = time.time() - path.stat().st_mtime
    except (FileNotFoundError, json.JSONDecodeError, OSError):
        return None
    if info.get("host") == socket.gethostname():
        return info if pid_alive(int(info.get("pid", -1))) else None
    return info if age < STALE_AFTER_S else None


def check_unlocked(out: Path) -> None:
    holder = lock_holder(out)
    if holder is not None:
        raise RunStateError(f"another driver is running on {out}: pid {holder.get('pid')} on host "
                            f"{holder.get('host')}, started {holder.get('started')}; wait for it to finish or stop it "
                            f"(a lock whose driver died is taken over automatically)")


class DriverLock:
    """Exclusive use of a run directory by one driver process, with a heartbeat."""

    def __init__(self, out: Path):
        self.path = Path(out) / LOCK
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> "DriverLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                check_unlocked(self.path.parent)
                print(f"[raypd] taking over the stale lock {self.path} of a driver that is gone", file=sys.stderr)
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(info, f)
            break
        else:
            raise RunStateError(f"could not take the lock {self.path}: another driver took it first")
        self._thread = threading.Thread(target=self._beat, name="raypd-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                return

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1)
        try:
            if json.loads(self.path.read_text()).get("pid") == os.getpid():
                self.path.unlink()
        except (OSError, json.JSONDecodeError):
            pass

    def __enter__(self) -> "DriverLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
