"""The shard reader's worker side: shard order, tar reading, decoding, batching, skip counts.

All of it runs inside DataLoader worker processes (or the main process with 0 workers).

Each reader (one rank x worker) turns raw WebDataset samples (``__key__``, ``__url__``,
``png``/``jpg``, ``cls``) into uint8 arrays and labels, collates them into float batches in
[-1, 1], and keeps the count of what it had to skip. Everything here is deliberately forgiving: one bad image or a broken tar must cost
that data only, never the run, and must always be counted and logged.
"""

from __future__ import annotations

import io
import logging
import random
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

log = logging.getLogger(__name__)

IMAGE_KEYS = ("png", "jpg", "jpeg")
NOISE_KEY = "z.npy"
"""A pair shard's noise beside its image: float32 [C, H, W], NumPy's format (read without pickles)."""
_PIL_MODES = {1: "L", 3: "RGB", 4: "RGBA"}
_LOUD_WARNINGS = 20  # per worker; later skips go to DEBUG plus a periodic summary, so logs stay readable


class SkipCounter:
    """Counts what one reader (one rank x worker) skipped; also a webdataset ``handler=``.

    ``skipped`` counts samples lost; ``errors`` counts I/O and tar errors reported by webdataset.
    """

    def __init__(self, reader: str):
        self.reader, self.skipped, self.errors = reader, 0, 0

    def __call__(self, exn: Exception) -> bool:
        """webdataset handler: log and carry on (the caller turns errors into lost samples)."""
        self.errors += 1
        self._warn("shard read error (%s): %r", self.reader, exn)
        return True

    def skip(self, url: str | None, key: str | None, reason: str, n: int = 1) -> None:
        self.skipped += n
        what = f"sample {key}" if key else f"{n} sample(s)"
        self._warn("skipped %s of %s (%s): %s", what, url, self.reader, reason)
        if self.skipped > _LOUD_WARNINGS and self.skipped % 100 < n:
            log.warning("%s has skipped %d samples so far", self.reader, self.skipped)

    def _warn(self, msg: str, *args: Any) -> None:
        level = logging.WARNING if self.skipped + self.errors <= _LOUD_WARNINGS else logging.DEBUG
        log.log(level, msg, *args)


def read_shards(sources: Iterable[dict], counter: SkipCounter, expected: dict[str, int],
                max_empty: int | None = None) -> Iterator[dict]:
    """Raw samples from each shard in turn, accounting for samples a broken shard lost.

    Shards are read one at a time so that a shard's errors and sample count are its own: with
    the manifest's count known, a truncated tar's loss is counted exactly (a tar cut at a header
    boundary ends silently in ``tarfile``, so counting is the only way to notice); without it,
    each read error counts as one lost sample. ``max_empty`` consecutive shards without a single
    sample end the stream with an error: an endless resampled stream would otherwise hang.
    """
    empty = 0
    for source in sources:
        url, errors_before, seen = source["url"], counter.errors, 0
        for sample in wds.tarfile_samples([dict(source)], handler=counter):
            seen += 1
            yield sample
        want = expected.get(url.rstrip("/").rsplit("/", 1)[-1])
        if want is not None and seen < want:
            counter.skip(url, None, f"shard yielded {seen} of the manifest's {want} samples", want - seen)
        elif want is None and counter.errors > errors_before:
            counter.skip(url, None, "shard had read errors", counter.errors - errors_before)
        empty = 0 if seen else empty + 1
        if max_empty is not None and empty >= max_empty:
            raise RuntimeError(f"{counter.reader}: the last {empty} shards it drew gave no samples "
                               f"(last: {url}); see the warnings above")


class SampleDecoder:
    """Raw sample -> (uint8 HWC image, label, noise or None); raises ValueError for anything unusable.

    ``pairs``: every sample must carry its noise (``z.npy``), as a Denoising Student's pair shards do."""

    def __init__(self, channels: int, num_classes: int, resolution: int | None,
                 flip_rng: random.Random | None, pairs: bool = False):
        if channels not in _PIL_MODES:
            raise ValueError(f"channels must be one of {sorted(_PIL_MODES)}, got {channels}")
        if pairs and flip_rng is not None:
            raise ValueError("a pair's image cannot be flipped: its noise would no longer map to it")
        self.mode, self.num_classes, self.channels, self.pairs = _PIL_MODES[channels], num_classes, channels, pairs
        self.shape = None if resolution is None else (resolution, resolution)
        self.flip_rng = flip_rng

    def __call__(self, sample: dict) -> tuple[np.ndarray, int, np.ndarray | None]:
        data = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
        if data is None:
            raise ValueError(f"no image (expected one of {IMAGE_KEYS}; has {sorted(sample)})")
        label = self._label(sample)
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # decode now, so truncated data fails here rather than later
            # convert() also covers grey shards for RGB models and RGB for grey ones
            arr = np.asarray(img.convert(self.mode) if img.mode != self.mode else img, dtype=np.uint8)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        if self.shape is None:
            self.shape = arr.shape[:2]  # batches must stack, so the first image sets the size
        elif arr.shape[:2] != self.shape:
            raise ValueError(f"image is {arr.shape[1]}x{arr.shape[0]}, "
                             f"expected {self.shape[1]}x{self.shape[0]}")
        if self.flip_rng is not None and self.flip_rng.random() < 0.5:
            arr = arr[:, ::-1]
        return np.ascontiguousarray(arr), label, self._noise(sample, arr.shape) if self.pairs else None

    def _noise(self, sample: dict, shape: tuple[int, ...]) -> np.ndarray:
        if NOISE_KEY not in sample:
            raise ValueError(f"no '{NOISE_KEY}' noise beside the image: not a pair shard")
        z = np.load(io.BytesIO(sample[NOISE_KEY]), allow_pickle=False)
        want = (self.channels, shape[0], shape[1])
        if z.shape != want or z.dtype != np.float32 or not np.isfinite(z).all():
            raise ValueError(f"noise is {z.dtype} {tuple(z.shape)}, expected finite float32 {want}")
        return z

    def _label(self, sample: dict) -> int:
        if self.num_classes <= 0:
            return -1
        if "cls" not in sample:
            raise ValueError("no 'cls' label, but the model is class-conditional")
        try:
            label = int(bytes(sample["cls"]).decode("ascii").strip())
        except (UnicodeDecodeError, ValueError) as exn:
            raise ValueError(f"label {sample['cls'][:20]!r} is not an integer") from exn
        if not 0 <= label < self.num_classes:
            raise ValueError(f"label {label} outside [0, {self.num_classes})")
        return label


def decode_samples(samples: Iterable[dict], decoder: Callable[[dict], tuple],
                   counter: SkipCounter) -> Iterator[tuple]:
    """Decode each sample, skipping (and counting) the ones that fail, whatever the reason."""
    for sample in samples:
        try:
            yield decoder(sample)
        except Exception as exn:  # noqa: BLE001 - any decoder failure means one bad sample
            counter.skip(sample.get("__url__"), sample.get("__key__"), f"{type(exn).__name__}: {exn}")


def collate(samples: list[tuple]) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """List of (HWC uint8, label, noise or None) -> (x float32 [B, C, H, W] in [-1, 1], y int64 [B] or None,
    z float32 [B, C, H, W] or None)."""
    images = torch.from_numpy(np.stack([s[0] for s in samples]))
    x = images.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0).contiguous()
    labels = [s[1] for s in samples]
    y = None if labels[0] < 0 else torch.tensor(labels, dtype=torch.int64)
    z = None if samples[0][2] is None else torch.from_numpy(np.stack([s[2] for s in samples]))
    return x, y, z


class ShardStream(IterableDataset):
    """One reader's batches; built in the DataLoader worker (or the main process with 0 workers).

    Yields ``(x, y, z, worker_id, skipped_so_far)`` tuples and, when a pass ends, a final
    ``(None, None, None, worker_id, skipped)`` so that skips after the last full batch are reported too.
    """

    def __init__(self, urls: list[str], opts: dict[str, Any], expected: dict[str, int]):
        super().__init__()
        self.urls, self.opts, self.expected = urls, opts, expected
        self.passes = 0  # lives in the (persistent) worker: pass k over the loader uses epoch + k
        self.counter: SkipCounter | None = None

    def __iter__(self) -> Iterator[tuple]:
        o = self.opts
        info = get_worker_info()
        wid, nw = (0, 1) if info is None else (info.id, info.num_workers)
        epoch, self.passes = o["epoch"] + self.passes, self.passes + 1
        if self.counter is None:
            self.counter = SkipCounter(f"rank {o['rank']} worker {wid}")
        own = self.urls[o["rank"] + o["world_size"] * wid::o["world_size"] * nw]
        max_empty = 2 * len(own) + 10 if o["resampled"] else None
        rng = random.Random(f"raypd-shards/{o['seed']}/{epoch}/{o['rank']}/{wid}")
        flip_rng = random.Random(rng.random()) if o["random_flip"] else None
        stages: list[Any] = [ShardOrder(own, rng, o["resampled"], o["shuffle_buffer"] > 0),
                             lambda src: read_shards(src, self.counter, self.expected, max_empty)]
        if o["shuffle_buffer"] > 0:
            size = o["shuffle_buffer"]
            stages.append(wds.shuffle(size, size, rng=random.Random(rng.random())))
        decoder = SampleDecoder(o["channels"], o["num_classes"], o["resolution"], flip_rng, o.get("pairs", False))
        stages += [lambda src: decode_samples(src, decoder, self.counter),
                   wds.batched(o["batch_size"], collation_fn=collate, partial=False)]
        for x, y, z in wds.DataPipeline(*stages):
            yield x, y, z, wid, self.counter.skipped
        yield None, None, None, wid, self.counter.skipped


class ShardOrder(IterableDataset):
    """This reader's shard URLs: drawn at random forever (resampled) or one pass over them."""

    def __init__(self, urls: list[str], rng: random.Random, resampled: bool, shuffle: bool):
        super().__init__()
        self.urls, self.rng, self.resampled, self.shuffle = urls, rng, resampled, shuffle

    def __iter__(self) -> Iterator[dict]:
        if self.resampled:
            while True:
                yield dict(url=self.rng.choice(self.urls))
        order = list(self.urls)
        if self.shuffle:
            self.rng.shuffle(order)
        for url in order:
            yield dict(url=url)
