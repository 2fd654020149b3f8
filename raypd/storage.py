"""Run storage on an object store (``s3://bucket/prefix``, ``gs://bucket/prefix``) or a path.

With a URI, the run's files live in the bucket and the driver works in a local mirror under the
temporary directory: at start it pulls the run from the bucket into a fresh mirror, and it pushes what
changed after every checkpoint, stage, evaluation point and report, and every few seconds between. A push
uploads commit markers (``meta.json`` of a checkpoint, ``metrics.json`` of a stage's checkpoint, the
evaluation record, the summary) after every other file, so a bucket copy cut off mid-push never looks
finished; a pull drops a stage checkpoint whose marker never arrived. Ray Train writes its own
checkpoints to the bucket directly (``<run>/ray``), and those are not mirrored.

pyarrow's file systems carry it: pyarrow already comes with Ray, Ray Train persists to the same file
systems, and S3 and Google Cloud Storage are built in. Credentials come from the standard environment
(``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``, ``AWS_ENDPOINT_URL``, instance
roles; ``GOOGLE_APPLICATION_CREDENTIALS``) and never appear in the URI, a run file or a log: a URI that
carries them is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import urlparse

from raypd.config.schema import uri_problem

MARKERS = ("meta.json", "metrics.json", "record.json", "summary.json")
"""Files that say the rest of their folder (or the run) is complete: uploaded last."""
NOT_MIRRORED = re.compile(r"^(ray/|sweeps/[^/]+/(tune|train|trials)/)")
"""Written to the bucket by Ray (Train checkpoints, Tune experiments) and by sweep trials themselves."""
PUSH_EVERY_S = 10.0


class StorageError(RuntimeError):
    """The run storage cannot be used as given."""


def is_uri(path: str | os.PathLike) -> bool:
    return isinstance(path, str) and "://" in path


def check_uri(uri: str) -> None:
    """Refuse a storage URI raypd cannot use or that carries credentials."""
    problem = uri_problem(uri)
    if problem:
        raise StorageError(f"run.storage_path {problem}")


def join(uri: str, *parts: str) -> str:
    parsed = urlparse(uri)
    path = "/".join([parsed.path.strip("/"), *[p.strip("/") for p in parts if p]]).strip("/")
    return f"{parsed.scheme}://{parsed.netloc}/{path}" + (f"?{parsed.query}" if parsed.query else "")


class Bucket:
    """A run's folder in an object store, through pyarrow's file system for its URI."""

    def __init__(self, uri: str):
        from pyarrow import fs

        check_uri(uri)
        self.uri = uri.rstrip("/")
        try:
            self.fs, self.base = fs.FileSystem.from_uri(self.uri)
        except Exception as err:  # noqa: BLE001 - pyarrow's errors name the URI but not what to do
            raise StorageError(f"cannot open {self.uri}: {err}") from err
        self.base = self.base.rstrip("/")
        self._pushed: dict[str, tuple[int, int]] = {}

    def _key(self, rel: str) -> str:
        return f"{self.base}/{rel}" if rel else self.base

    def files(self, prefix: str = "") -> dict[str, int]:
        """Every object under ``prefix`` (relative to the run), with its size."""
        from pyarrow import fs

        selector = fs.FileSelector(self._key(prefix), recursive=True, allow_not_found=True)
        return {info.path[len(self.base) + 1:]: info.size for info in self.fs.get_file_info(selector)
                if info.type == fs.FileType.File}

    def read_bytes(self, rel: str) -> bytes | None:
        from pyarrow import fs

        if self.fs.get_file_info(self._key(rel)).type != fs.FileType.File:
            return None
        with self.fs.open_input_stream(self._key(rel)) as f:
            return f.read()

    def write_bytes(self, rel: str, data: bytes) -> None:
        with self.fs.open_output_stream(self._key(rel)) as f:
            f.write(data)

    def move_aside(self, keep: str) -> str | None:
        """``--restart``: move the run's objects (all but ``keep``) to a dated prefix beside it; nothing is
        deleted. Returns the new prefix's URI (None when the run had no files)."""
        found = [rel for rel in self.files() if rel != keep]
        if not found:
            return None
        aside = f"{self.base}.{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
        for rel in found:
            self.fs.copy_file(self._key(rel), f"{aside}/{rel}")
        for rel in found:
            self.fs.delete_file(self._key(rel))
        self._pushed.clear()
        return f"{urlparse(self.uri).scheme}://{aside}"

    def delete(self, rel: str) -> None:
        from pyarrow import fs

        if self.fs.get_file_info(self._key(rel)).type == fs.FileType.File:
            self.fs.delete_file(self._key(rel))

    def pull(self, local: Path) -> int:
        """Copy the run's files (all but Ray's own) into ``local``; returns how many."""
        from pyarrow import fs

        found = {rel: size for rel, size in self.files().items() if not NOT_MIRRORED.match(rel)}
        for rel in _incomplete_checkpoints(found):
            found.pop(rel)
        for rel in found:
            target = local / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            fs.copy_files(self._key(rel), str(target), source_filesystem=self.fs,
                          destination_filesystem=fs.LocalFileSystem())
            self._pushed[rel] = _stamp(target)
        return len(found)

    def push(self, local: Path) -> int:
        """Upload what changed in ``local`` since the last push or pull (markers last) and remove what is gone
        from it; returns how many files were uploaded."""
        from pyarrow import fs

        now: dict[str, tuple[int, int]] = {}
        for path in local.rglob("*"):
            rel = path.relative_to(local).as_posix()
            if path.is_file() and not any(part.startswith(".") for part in rel.split("/")) \
                    and not NOT_MIRRORED.match(rel) and rel != "driver.lock":
                now[rel] = _stamp(path)
        changed = [rel for rel, stamp in now.items() if self._pushed.get(rel) != stamp]
        changed.sort(key=lambda rel: (rel.rsplit("/", 1)[-1] in MARKERS, rel))
        for rel in changed:
            fs.copy_files(str(local / rel), self._key(rel), source_filesystem=fs.LocalFileSystem(),
                          destination_filesystem=self.fs)
            self._pushed[rel] = now[rel]
        for rel in sorted(set(self._pushed) - set(now), key=lambda r: r.rsplit("/", 1)[-1] not in MARKERS):
            self.delete(rel)  # markers first: a folder being removed stops counting as complete at once
            self._pushed.pop(rel)
        return len(changed)


def cache_dir(*parts: str) -> Path:
    """raypd's cache on this machine: ``$RAYPD_CACHE``, else ``~/.cache/raypd`` (files any run may reuse: the
    bucket objects a worker fetched, a teacher's scored baselines)."""
    root = os.environ.get("RAYPD_CACHE") or str(Path.home() / ".cache" / "raypd")
    return Path(root).joinpath(*parts)


def fetch(location: str, cache: Path | None = None) -> str:
    """A local copy of ``location`` (an object, or a folder of objects, in a bucket) under ``cache``, downloaded
    once (default: ``cache_dir("fetch")``); a plain path or URL comes back as it is. Ray workers read the teacher
    and the shards this way."""
    if not is_uri(location):
        return location
    cache = cache_dir("fetch") if cache is None else cache
    from pyarrow import fs

    source_fs, path = fs.FileSystem.from_uri(location)
    info = source_fs.get_file_info(path)
    if info.type == fs.FileType.NotFound:
        raise FileNotFoundError(f"{location} is not in the bucket")
    # a copy is kept per version of what lies there (its files' sizes and times): a run restarted under the same
    # name writes a new teacher at the same address, which must not be read from an older copy
    files = (source_fs.get_file_info(fs.FileSelector(path, recursive=True)) if info.type == fs.FileType.Directory
             else [info])
    version = hashlib.sha1(json.dumps(sorted((f.path, f.size, f.mtime_ns) for f in files
                                             if f.type == fs.FileType.File), default=str).encode()).hexdigest()[:16]
    target = (Path(cache) / hashlib.sha1(location.encode()).hexdigest()[:16] / version
              / location.rstrip("/").rsplit("/", 1)[-1])
    if target.exists():
        return str(target)
    staged = target.with_name(f".{target.name}.part{os.getpid()}")
    staged.parent.mkdir(parents=True, exist_ok=True)
    if info.type == fs.FileType.Directory:
        staged.mkdir(parents=True, exist_ok=True)
    fs.copy_files(path, str(staged), source_filesystem=source_fs, destination_filesystem=fs.LocalFileSystem())
    try:
        os.replace(staged, target)
    except OSError:  # another rank on this node got there first
        shutil.rmtree(staged, ignore_errors=True)
    return str(target)


def child(location: str | Path, *parts: str) -> str:
    """``location/part/...`` for a path or a bucket URI."""
    return join(str(location), *parts) if is_uri(str(location)) else str(Path(location).joinpath(*parts))


def read_text(location: str | Path) -> str | None:
    """A file's text, in a bucket or on disk; None when it is not there."""
    if not is_uri(str(location)):
        path = Path(location)
        return path.read_text() if path.is_file() else None
    from pyarrow import fs

    source, path = fs.FileSystem.from_uri(str(location))
    if source.get_file_info(path).type != fs.FileType.File:
        return None
    with source.open_input_stream(path) as f:
        return f.read().decode()


def write_text(location: str | Path, text: str) -> None:
    """Write a file in a bucket or on disk (whole: a bucket object is replaced at once)."""
    if not is_uri(str(location)):
        Path(location).parent.mkdir(parents=True, exist_ok=True)
        Path(location).write_text(text)
        return
    from pyarrow import fs

    target, path = fs.FileSystem.from_uri(str(location))
    with target.open_output_stream(path) as f:
        f.write(text.encode())


def upload_dir(local: Path, location: str) -> None:
    """Copy a local folder to a bucket prefix, its ``meta.json`` last (the marker that it is complete)."""
    from pyarrow import fs

    target, base = fs.FileSystem.from_uri(location)
    files = sorted((p for p in Path(local).rglob("*") if p.is_file()), key=lambda p: (p.name in MARKERS, str(p)))
    for path in files:
        fs.copy_files(str(path), f"{base}/{path.relative_to(local).as_posix()}",
                      source_filesystem=fs.LocalFileSystem(), destination_filesystem=target)


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def _incomplete_checkpoints(found: dict[str, int]) -> list[str]:
    """Files of stage checkpoints (``.../checkpoint_<n>/``) whose ``metrics.json`` never arrived."""
    folders: dict[str, list[str]] = {}
    for rel in found:
        parts = rel.split("/")
        for i, part in enumerate(parts[:-1]):
            if part.startswith("checkpoint_"):
                folders.setdefault("/".join(parts[: i + 1]), []).append(rel)
                break
    return [rel for folder, rels in folders.items() if f"{folder}/metrics.json" not in found for rel in rels]


def mirror_dir(uri: str) -> Path:
    """The local mirror of a run stored at ``uri``: under the temporary directory, named after the URI."""
    key = hashlib.sha1(uri.rstrip("/").encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / "raypd-mirror" / key


class Mirror:
    """The driver's local copy of a run in a bucket: pulled fresh at start, pushed as it changes."""

    def __init__(self, bucket: Bucket, local: Path):
        self.bucket, self.local = bucket, Path(local)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def open(self) -> "Mirror":
        shutil.rmtree(self.local, ignore_errors=True)  # what a driver that died left here may be ahead of the bucket
        self.local.mkdir(parents=True, exist_ok=True)
        count = self.bucket.pull(self.local)
        print(f"[storage] {self.bucket.uri}: {count} run file(s) pulled into {self.local}", file=sys.stderr,
              flush=True)
        self._thread = threading.Thread(target=self._every, name="raypd-storage-push", daemon=True)
        self._thread.start()
        return self

    def sync(self) -> None:
        with self._lock:
            self.bucket.push(self.local)

    def locate(self, path: str) -> str:
        """The bucket URI of a file or folder in the mirror (anything else comes back as it is)."""
        try:
            rel = Path(path).resolve().relative_to(self.local.resolve())
        except ValueError:
            return path
        return join(self.bucket.uri, rel.as_posix())

    def _every(self) -> None:
        while not self._stop.wait(PUSH_EVERY_S):
            try:
                self.sync()
            except Exception as err:  # noqa: BLE001 - the next sync retries; the final one raises
                print(f"[storage] push to {self.bucket.uri} failed, retrying: {err}", file=sys.stderr, flush=True)

    def close(self) -> None:
        """Stop the periodic push and push what is left."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.sync()


class BucketLock:
    """One driver per run in a bucket: a lease object (owner, host, pid, expiry) renewed by a heartbeat.

    pyarrow's file systems offer no conditional write, so taking the lease is write-then-read-back: after a
    pause, the lease must still name this driver, or another driver won the race and this one refuses.
    A lease whose heartbeat stopped for ``stale_s`` is taken over with a warning.
    """

    NAME = "driver.lock"

    def __init__(self, bucket: Bucket, *, heartbeat_s: float = 15.0, stale_s: float = 120.0, settle_s: float = 1.0):
        self.bucket, self.heartbeat_s, self.stale_s, self.settle_s = bucket, heartbeat_s, stale_s, settle_s
        self.owner = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _lease(self) -> dict:
        return {"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(),
                "renewed": time.time(), "expires": time.time() + self.stale_s}

    def holder(self) -> dict | None:
        raw = self.bucket.read_bytes(self.NAME)
        try:
            info = json.loads(raw) if raw else None
        except json.JSONDecodeError:
            return None
        if not info or info.get("expires", 0) <= time.time():
            return None
        if info.get("host") == socket.gethostname() and not pid_alive(int(info.get("pid", -1))):
            return None  # its driver, on this host, is gone
        return info

    def acquire(self) -> "BucketLock":
        held = self.holder()
        if held is not None and held.get("owner") != self.owner:
            raise StorageError(f"another driver is running on {self.bucket.uri}: pid {held.get('pid')} on host "
                                f"{held.get('host')}; its lease expires in {held['expires'] - time.time():.0f} s "
                                "unless it renews it (a lease whose driver died is taken over once it expires)")
        if self.bucket.read_bytes(self.NAME):
            print(f"[raypd] taking over the expired lease {self.bucket.uri}/{self.NAME} of a driver that is gone",
                  file=sys.stderr)
        self.bucket.write_bytes(self.NAME, json.dumps(self._lease()).encode())
        time.sleep(self.settle_s)
        held = self.holder()
        if held is None or held.get("owner") != self.owner:
            raise StorageError(f"could not take the lease on {self.bucket.uri}: another driver took it first")
        self._thread = threading.Thread(target=self._beat, name="raypd-lease-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.bucket.write_bytes(self.NAME, json.dumps(self._lease()).encode())
            except Exception:  # noqa: BLE001 - a missed renewal is retried at the next beat
                continue

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        held = self.holder()
        if held is not None and held.get("owner") == self.owner:
            self.bucket.delete(self.NAME)

    def __enter__(self) -> "BucketLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
