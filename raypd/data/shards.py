"""WebDataset shard reader: URL expansion, start-up checks and the training batch stream.

Shards are ``train-NNNNNN.tar`` files with a ``manifest.json`` beside them (see the shard
writer). Each rank reads a fixed, disjoint subset of the shards and each of its DataLoader
workers a subset of that (shard i goes to reader slot i mod (world_size * workers)), decoding
inside the worker processes.

Remote shards: webdataset 1.0.2 opens ``http(s)://`` itself (through ``curl``) but has no
``s3://`` handler and opens ``gs://`` through the ``gsutil`` command line tool, so this module
registers one fsspec-based opener for the object-store schemes in ``webdataset.gopen_schemes``
(once, at import, which also happens in spawned workers when they unpickle the dataset).
"""

from __future__ import annotations

import glob
import json
import logging
import os
from typing import Any, Iterator, Sequence

import braceexpand
import webdataset as wds
from torch.utils.data import DataLoader

from raypd.config import DataConfig
from raypd.data.batch import Batch
from raypd.data.decode import ShardStream

log = logging.getLogger(__name__)

# schemes opened through fsspec, and the package that gives fsspec each one
FSSPEC_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs",
                   "abfs": "adlfs", "abfss": "adlfs", "memory": "fsspec"}


class DataError(ValueError):
    """The training data cannot be used as configured (found at start-up, before training)."""


def _scheme(url: str) -> str:
    return url.split("://", 1)[0].lower() if "://" in url else ""


def _local_path(url: str) -> str | None:
    """The file system path of a local URL (plain path or file://), None for remote ones."""
    scheme = _scheme(url)
    if scheme == "file":
        return url[len("file://"):]
    return None if scheme or url.startswith("pipe:") else url


def _gopen_fsspec(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any):
    """webdataset opener for object stores, through fsspec."""
    import fsspec

    try:
        return fsspec.open(url, mode).open()
    except ImportError as exn:
        package = FSSPEC_PACKAGES.get(_scheme(url), "the fsspec backend")
        raise ImportError(f"{url}: reading {_scheme(url)}:// shards needs `pip install {package}`") from exn


def _register_openers() -> None:
    for scheme in FSSPEC_PACKAGES:
        wds.gopen_schemes[scheme] = _gopen_fsspec


_register_openers()


def require_filesystems(urls: Sequence[str]) -> None:
    """Fail fast, naming the package to install, when a URL's fsspec backend is missing."""
    import fsspec

    for scheme in sorted({_scheme(u) for u in urls} & FSSPEC_PACKAGES.keys()):
        try:
            fsspec.get_filesystem_class(scheme)
        except ImportError as exn:
            raise DataError(f"shards at {scheme}:// need the {FSSPEC_PACKAGES[scheme]} package: "
                            f"pip install {FSSPEC_PACKAGES[scheme]}") from exn


def _split_top_level(text: str) -> list[str]:
    """Split a comma-separated list, leaving the commas of brace alternatives ({a,b}) alone."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += (ch == "{") - (ch == "}")
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return [p.strip() for p in parts + [text[start:]] if p.strip()]


def expand_urls(urls: str | Sequence[str]) -> list[str]:
    """Brace patterns, comma-separated lists, lists, or a local directory (its train-*.tar, sorted)."""
    items = _split_top_level(urls) if isinstance(urls, str) else [str(u) for u in urls]
    out: list[str] = []
    for item in items:
        path = _local_path(item)
        if path is not None and os.path.isdir(path):
            found = sorted(glob.glob(os.path.join(glob.escape(path), "train-*.tar")))
            if not found:
                raise DataError(f"{item}: directory has no train-*.tar shards")
            out.extend(found)
        else:
            out.extend(braceexpand.braceexpand(item))
    return out


def _manifest_url(first: str) -> str:
    return first.rsplit("/", 1)[0] + "/manifest.json" if "/" in first else "manifest.json"


def read_manifest(urls: list[str]) -> dict | None:
    """manifest.json beside the first shard; None when there is none (or it cannot be reached)."""
    if not urls:
        return None
    url = _manifest_url(urls[0])
    path = _local_path(url)
    try:
        if path is not None:
            with open(path, "rb") as f:
                text = f.read()
        else:
            import fsspec

            with fsspec.open(url, "rb") as f:
                text = f.read()
    except FileNotFoundError:
        return None
    except (ImportError, OSError) as exn:
        log.warning("cannot read %s (%r); shard checks against the manifest are skipped", url, exn)
        return None
    try:
        manifest = json.loads(text)
    except ValueError as exn:
        raise DataError(f"{url}: not valid JSON ({exn})") from exn
    if not isinstance(manifest, dict):
        raise DataError(f"{url}: expected a JSON object")
    return manifest


def _missing(urls: list[str]) -> list[str]:
    """Shards that do not exist; remote ones are checked only where fsspec can reach them."""
    missing = [u for u in urls if _local_path(u) is not None and not os.path.isfile(_local_path(u))]
    remote = [u for u in urls if _local_path(u) is None and not u.startswith("pipe:")]
    if remote:
        import fsspec

        for scheme in sorted({_scheme(u) for u in remote}):
            group = [u for u in remote if _scheme(u) == scheme]
            try:
                fs = fsspec.filesystem(scheme)
            except (ImportError, ValueError) as exn:
                log.info("not checking %s:// shards exist (%r)", scheme, exn)
                continue
            # one listing per directory is far cheaper than a request per shard; exists() confirms
            listed: set[str] = set()
            for parent in sorted({u.rsplit("/", 1)[0] for u in group}):
                try:
                    listed.update(fs._strip_protocol(p) for p in fs.ls(parent, detail=False))
                except Exception:  # noqa: BLE001 - listing is only a shortcut
                    pass
            missing += [u for u in group if fs._strip_protocol(u) not in listed and not fs.exists(u)]
    return missing


def check_shards(urls: Sequence[str], *, resolution: int, channels: int, num_classes: int,
                 world_size: int, num_workers: int) -> dict | None:
    """Start-up checks for the shards the run will read; returns the manifest (or None)."""
    urls = list(urls)
    if not urls:
        raise DataError("no training shards: the shard URL list is empty")
    missing = _missing(urls)
    if missing:
        raise DataError(f"{len(missing)} of {len(urls)} shards do not exist, e.g. {missing[0]}")
    readers = world_size * max(1, num_workers)
    if len(urls) < readers:
        raise DataError(f"{len(urls)} shards for {world_size} ranks x {max(1, num_workers)} loader workers: "
                        f"each of the {readers} readers needs at least one shard (write more, smaller "
                        "shards or use fewer workers)")
    manifest = read_manifest(urls)
    if manifest is None:
        log.warning("no manifest.json beside %s: resolution/channels/classes are not checked", urls[0])
        return None
    where = _manifest_url(urls[0])
    for name, want in (("resolution", resolution), ("channels", channels), ("num_classes", num_classes)):
        have = manifest.get(name)
        if have is None or have == want:
            continue
        if name == "num_classes" and want == 0:
            log.info("%s: labels (%s classes) are ignored by the unconditional model", where, have)
            continue
        raise DataError(f"{where}: shards have {name} {have} but the model is configured with {name} {want}")
    return manifest


def _shard_counts(manifest: dict | None) -> dict[str, int]:
    """Shard name -> sample count, from every split the manifest lists."""
    counts: dict[str, int] = {}
    for split in (manifest or {}).get("splits", {}).values():
        for shard in split.get("shards", []) if isinstance(split, dict) else []:
            if isinstance(shard, dict) and "name" in shard and "count" in shard:
                counts[str(shard["name"])] = int(shard["count"])
    return counts


def _keep(item: Any) -> Any:
    return item  # batches are already collated in the workers


class ShardLoader:
    """Iterable of :class:`Batch` from WebDataset shards, split by rank and loader worker.

    ``resampled=True`` is endless (step-based training: no rank runs out first); ``False`` is
    one epoch in which every sample is read once across all ranks x workers, except that each
    reader drops its last partial batch. Iterating the loader again continues with the next
    epoch (``epoch + k`` on pass k). ``resolution`` (optional) makes other-sized images count as
    corrupt; without it each reader's first image sets the size.
    """

    def __init__(self, urls: str | Sequence[str], *, batch_size: int, channels: int, num_classes: int,
                 rank: int = 0, world_size: int = 1, num_workers: int = 0, seed: int = 0,
                 random_flip: bool = False, shuffle_buffer: int = 1000, resampled: bool = True,
                 epoch: int = 0, resolution: int | None = None, max_skipped_fraction: float = 1.0,
                 judge_after: int = 200, pairs: bool = False):
        """``max_skipped_fraction``: once ``judge_after`` samples were read or skipped, a larger share of
        skipped (corrupt) samples stops the run with a DataError instead of training on what is left. ``pairs``:
        pair shards, every image with the noise it was sampled from (``Batch.z``)."""
        self.urls = expand_urls(urls)
        self.max_skipped_fraction, self.judge_after, self._seen = max_skipped_fraction, judge_after, 0
        readers = world_size * max(1, num_workers)
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside world_size {world_size}")
        if len(self.urls) < readers:
            raise DataError(f"{len(self.urls)} shards for {world_size} ranks x {max(1, num_workers)} "
                            f"loader workers: each of the {readers} readers needs at least one shard")
        if batch_size < 1:
            raise DataError(f"batch_size must be positive, got {batch_size}")
        require_filesystems(self.urls)
        opts = dict(batch_size=batch_size, channels=channels, num_classes=num_classes, rank=rank,
                    world_size=world_size, seed=seed, random_flip=random_flip, resampled=resampled,
                    shuffle_buffer=shuffle_buffer, epoch=epoch, resolution=resolution, pairs=pairs)
        self._stream = ShardStream(self.urls, opts, _shard_counts(read_manifest(self.urls)))
        self._loader = DataLoader(self._stream, batch_size=None, collate_fn=_keep, num_workers=num_workers,
                                  persistent_workers=num_workers > 0)
        self._skipped: dict[int, int] = {}

    @property
    def skipped_samples(self) -> int:
        """Samples skipped so far, summed over workers (as of each worker's latest batch)."""
        return sum(self._skipped.values())

    def __iter__(self) -> Iterator[Batch]:
        for x, y, z, wid, skipped in self._loader:
            self._skipped[wid] = skipped
            if x is not None:
                self._seen += x.shape[0]
                self._check_skips()
                yield Batch(x=x, y=y, z=z)
        self._check_skips()

    def _check_skips(self) -> None:
        bad, total = self.skipped_samples, self.skipped_samples + self._seen
        if total >= self.judge_after and bad > self.max_skipped_fraction * total:
            raise DataError(f"{bad} of {total} samples read so far were corrupt or unreadable, more than "
                            f"data.max_skipped_fraction={self.max_skipped_fraction}; check the shards (the "
                            f"warnings above name them) or raise the limit")


def training_loader(urls: Sequence[str], cfg: DataConfig, *, batch_size: int, seed: int, stream: int,
                    rank: int = 0, world_size: int = 1, epoch: int = 0, pairs: bool = False) -> ShardLoader:
    """The endless, seeded training stream of one stage (``stream``) on one rank: the one place the data
    settings become a loader, for the in-process loop and the Ray workers alike. ``pairs``: the Denoising
    Student's (noise, sample) shards, never flipped."""
    return ShardLoader(urls, batch_size=batch_size, channels=cfg.channels, num_classes=cfg.num_classes, rank=rank,
                       world_size=world_size, num_workers=cfg.loader_workers, seed=seed * 1000 + stream,
                       random_flip=cfg.random_flip and not pairs, shuffle_buffer=cfg.shuffle_buffer, resampled=True,
                       epoch=epoch, resolution=cfg.resolution, max_skipped_fraction=cfg.max_skipped_fraction,
                       pairs=pairs)
