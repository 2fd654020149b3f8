"""One evaluated point as a stream of chunks, so that no process holds a whole sample set.

A point (one sampler at one step count over ``eval.num_samples`` noises) is cut into chunks of
``eval.chunk_size`` samples. Each chunk draws its own slice of the fixed noise, samples it (the network
under bf16 autocast on GPUs, the sampler's arithmetic in fp32), turns the images into uint8 and extracts
their features: in this process, or on a Ray task (``raypd.distributed.evaluate``). The driver folds the
chunks in as they arrive: it keeps the features (a few KB per sample), the grid's first images, the
running squared distance to the teacher's full sampler, and writes the full sampler's own images to an
on-disk uint8 array. Its memory grows with the chunk size, not with the sample count.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from torch import Tensor

from raypd.diffusion.ddim import LogsnrFn
from raypd.eval.fid import Extractor, extract_features, to_uint8
from raypd.eval.samples import NOISE_BLOCK, block_seed, noise_slice, noisy_sampler, sample_ddim, sample_stochastic
from raypd.models import Denoiser
from raypd.models.denoiser import forward_dtype

Result = tuple["Chunk", Tensor, dict[str, Tensor]]
"""(the chunk, its uint8 images [n, C, H, W], their features) as a chunk comes back."""


@dataclass(frozen=True)
class Chunk:
    """Samples ``start:stop`` of one point: plain data, so it travels to a Ray task as it is."""

    sampler: str
    """``ddim`` (deterministic), ``stochastic`` (ancestral) or ``consistency`` (the multistep consistency sampler;
    ``consistency@T`` starts it at t = T); the step noise of the last two is seeded per noise block."""
    n_steps: int
    start: int
    stop: int
    seed: int
    channels: int
    resolution: int
    num_classes: int
    precision: str
    """The network's forward in sampling: ``auto`` (bf16 on GPUs that have it), ``bf16`` or ``fp32``."""
    extractor: dict
    kid: bool
    prc: bool
    guidance: float | None = None
    """The classifier-free guidance weight of every sampling step (None: unguided)."""

    def to_dict(self) -> dict:
        return asdict(self)


def chunks_for(n: int, sampler: str, n_steps: int, *, data, seed: int, precision: str, extractor: Extractor,
               kid: bool, prc: bool, chunk_size: int = 2048, guidance: float | None = None) -> list[Chunk]:
    """``n`` samples as chunks of ``chunk_size`` (whole noise blocks), the last one what remains."""
    ext = {"kind": extractor.kind, "weights": extractor.weights, "tag": extractor.tag}
    return [Chunk(sampler, n_steps, start, min(start + chunk_size, n), seed, data.channels, data.resolution,
                  data.num_classes, precision, ext, kid, prc, guidance)
            for start in range(0, n, chunk_size)]


def chunks_of(cfg, sampler: str, n_steps: int, extractor: Extractor, guidance: float | None = None,
              samples: int | None = None) -> list[Chunk]:
    """A run's point as chunks, from its ``eval`` settings (``samples``: other than ``eval.num_samples``)."""
    e = cfg.eval
    return chunks_for(samples or e.num_samples, sampler, n_steps, data=cfg.data, seed=e.seed, precision=e.precision,
                      extractor=extractor, kid=e.kid, prc=e.precision_recall, chunk_size=e.chunk_size,
                      guidance=guidance)


LABEL_HITS = "label_hits"
"""A class-conditional point scored with the classifier extractor also keeps, per sample, whether the classifier
reads it as the label it was sampled for (1.0) or not (0.0)."""


def sampling_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of the network in sampling (None: fp32)."""
    return forward_dtype(precision, device)


def sampling_name(precision: str, *, gpu: bool, device: torch.device | None = None) -> str:
    """``bf16`` or ``fp32``: what ``eval.precision`` comes to where the chunks run (``device`` when they run here;
    Ray's GPU tasks are taken to support bf16, as every GPU type the cluster files offer does)."""
    if device is not None:
        return "bf16" if sampling_dtype(precision, device) is not None else "fp32"
    return "bf16" if precision == "bf16" or (precision == "auto" and gpu) else "fp32"


def generate_chunk(model: Denoiser, chunk: Chunk, *, logsnr_fn: LogsnrFn, device: torch.device,
                   extractor: Extractor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """One chunk's uint8 images and their features (``extractor``: the chunk's own, with local weights)."""
    z, y = noise_slice(chunk.start, chunk.stop, chunk.channels, chunk.resolution, seed=chunk.seed,
                       num_classes=chunk.num_classes)
    dtype = sampling_dtype(chunk.precision, device)
    if chunk.sampler == "ddim":
        samples = sample_ddim(model, z, y, chunk.n_steps, logsnr_fn=logsnr_fn, device=device, dtype=dtype,
                              w=chunk.guidance)
    elif noisy_sampler(chunk.sampler) is not None:
        parts = []
        for lo in range(0, z.shape[0], NOISE_BLOCK):  # the step noise of block k comes from (seed, k) alone
            block = (chunk.start + lo) // NOISE_BLOCK
            parts.append(sample_stochastic(model, z[lo:lo + NOISE_BLOCK], None if y is None else y[lo:lo + NOISE_BLOCK],
                                           chunk.n_steps, logsnr_fn=logsnr_fn, device=device, dtype=dtype,
                                           seed=block_seed(chunk.seed, block, chunk.sampler), w=chunk.guidance,
                                           sampler=chunk.sampler))
        samples = torch.cat(parts)
    else:
        raise ValueError(f"unknown sampler {chunk.sampler!r}")
    images = to_uint8(samples)
    del samples
    extractor = extractor or Extractor(**chunk.extractor)
    features = extract_features(images, extractor, kid=chunk.kid, prc=chunk.prc)
    if y is not None and extractor.kind == "classifier":
        features[LABEL_HITS] = label_hits(images, y, extractor)
    return images, {k: v.cpu() for k, v in features.items()}


@torch.inference_mode()
def label_hits(images: Tensor, y: Tensor, extractor: Extractor) -> Tensor:
    """1.0 where the classifier extractor reads a uint8 image as its label ``y``, else 0.0."""
    from raypd.eval.classifier import load_classifier

    net = load_classifier(extractor.weights)
    hits = [(net(images[lo:lo + NOISE_BLOCK].float() / 127.5 - 1.0).argmax(1) == y[lo:lo + NOISE_BLOCK]).float()
            for lo in range(0, images.shape[0], NOISE_BLOCK)]
    return torch.cat(hits)


def run_here(model: Denoiser, chunks: Iterable[Chunk], *, logsnr_fn: LogsnrFn, device: torch.device
             ) -> Iterator[Result]:
    """The chunks in this process, one at a time."""
    for chunk in chunks:
        yield (chunk, *generate_chunk(model, chunk, logsnr_fn=logsnr_fn, device=device))


class FullSamples:
    """The teacher's full-sampler images as a uint8 array on disk ([N, C, H, W] in NumPy's format, read without
    unpickling), written and read a chunk at a time with plain file I/O, so that the driver's memory holds a
    chunk rather than the set."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def exists(self, shape: tuple[int, ...]) -> bool:
        if not self.path.is_file():
            return False
        try:
            array = np.load(self.path, mmap_mode="r", allow_pickle=False)
        except ValueError:
            return False
        return array.shape == tuple(shape) and array.dtype == np.uint8

    def read(self, start: int, stop: int) -> Tensor:
        array = np.load(self.path, mmap_mode="r", allow_pickle=False)
        out = torch.from_numpy(np.array(array[start:stop]))
        del array  # the map goes with it, and the pages it touched with the map
        return out

    def writer(self, shape: tuple[int, ...]) -> "_FullWriter":
        return _FullWriter(self.path, shape)


class _FullWriter:
    def __init__(self, path: Path, shape: tuple[int, ...]):
        self.path, self.shape = path, tuple(shape)
        self.tmp = path.with_name(f".{path.name}.partial")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.tmp, "w+b")
        np.lib.format.write_array_header_1_0(self.file, {"descr": "|u1", "fortran_order": False, "shape": self.shape})
        self.offset = self.file.tell()
        self.per_sample = math.prod(self.shape[1:])
        self.file.truncate(self.offset + math.prod(self.shape))

    def write(self, start: int, images: Tensor) -> None:
        self.file.seek(self.offset + start * self.per_sample)
        self.file.write(images.contiguous().numpy().tobytes())

    def close(self) -> None:
        self.file.close()
        self.tmp.replace(self.path)

    def discard(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


def _squared_distance(a: Tensor, b: Tensor) -> float:
    """The summed squared difference of two uint8 image sets, a noise block at a time (exact in float64)."""
    total = 0.0
    for lo in range(0, a.shape[0], NOISE_BLOCK):
        d = a[lo:lo + NOISE_BLOCK].to(torch.int32) - b[lo:lo + NOISE_BLOCK].to(torch.int32)
        total += d.square_().sum(dtype=torch.int64).item()
    return total


@dataclass
class Point:
    """What the driver keeps of a point: its features (in sample order), the grid's images and the distance
    to the full sampler."""

    features: dict[str, Tensor]
    grid: Tensor
    """The first ``eval.grid_size`` images, in [-1, 1]."""
    rmse_to_full: float
    n_samples: int


def collect(results: Iterable[Result], *, n: int, shape: tuple[int, ...], grid_size: int,
            full: FullSamples | None, write_full: bool = False, progress=None) -> Point:
    """Fold a point's chunks in as they come, in any order. ``full``: the teacher's full-sampler images, which
    this point's distance is measured to (``write_full``: this point is that sampler, so its chunks are written
    there and its distance is 0). ``progress(done, n)`` is called after each chunk."""
    writer = full.writer((n, *shape)) if write_full else None
    # features go into buffers sized once for the set: small long-lived pieces between the chunks' large
    # short-lived images would fragment the heap and grow the process by a chunk per chunk
    features: dict[str, Tensor] = {}
    grid: dict[int, Tensor] = {}
    squared, seen = 0.0, 0
    try:
        for chunk, images, feats in results:
            for key, value in feats.items():
                if key not in features:
                    features[key] = torch.empty((n, *value.shape[1:]), dtype=value.dtype)
                features[key][chunk.start:chunk.stop] = value
            if chunk.start < grid_size:  # chunks start at multiples of the chunk size
                grid[chunk.start] = images[: grid_size - chunk.start].clone()
            if writer is not None:
                writer.write(chunk.start, images)
            elif full is not None:
                squared += _squared_distance(images, full.read(chunk.start, chunk.stop))
            seen += images.shape[0]
            del images, feats
            if progress is not None:
                progress(seen, n)
    except BaseException:
        if writer is not None:
            writer.discard()
        raise
    if seen != n:
        if writer is not None:
            writer.discard()
        raise RuntimeError(f"evaluation: {seen} samples came back, {n} were asked for")
    if writer is not None:
        writer.close()
    images = (torch.cat([grid[s] for s in sorted(grid)]).float() / 127.5 - 1.0 if grid
              else torch.empty(0, *shape))
    per_pixel = n * math.prod(shape)
    distance = 0.0 if write_full else math.sqrt(squared / per_pixel) / 127.5 if full is not None else float("nan")
    return Point(features, images, distance, n)
