"""The FID protocol behind a number: everything needed to say whether two FIDs can be compared, and to
compute the same one again.

FIDs of this paper's reimplementations are often not comparable: the reference set, the sample count,
the resizing and the feature weights all differ between them. Every FID raypd writes carries this
record: the extractor and a digest of its weights, the reference set (source, split, count and a digest
of its pixels), the sample count, the noise seed and scheme, and how images reach the extractor.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import torch
from torch import Tensor

INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")
"""torch-fidelity's Inception-v3 weights (the TensorFlow FID graph's, ported), downloaded when no file is set."""
NOISE_SCHEME = "blocks-256"
"""The evaluation noise: blocks of 256 samples, each drawn from its own seed (``raypd.eval.samples``)."""
PIXELS = "uint8: round((clip(x_hat, -1, 1) + 1) * 127.5)"


@functools.lru_cache(maxsize=16)
def _file_sha256(path: str, mtime_ns: int, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    stat = Path(path).stat()
    return _file_sha256(str(path), stat.st_mtime_ns, stat.st_size)


def images_sha256(images: Tensor) -> str:
    """Digest of uint8 images [N, C, H, W]: their shape and pixels, in order."""
    images = images.contiguous()
    digest = hashlib.sha256(json.dumps(list(images.shape)).encode())
    digest.update(images.numpy().tobytes())
    return digest.hexdigest()


def extractor_identity(extractor) -> dict:
    """The extractor's name, weights file and that file's digest (what changes the features)."""
    if extractor.kind == "classifier":
        weights = Path(extractor.weights) / "model.safetensors"
        return {"name": extractor.name, "weights": str(weights), "weights_sha256": file_sha256(weights),
                "resize": "none: the classifier sees the images at the data's resolution"}
    weights = extractor.weights
    if not weights:  # torch-fidelity's download, where it keeps it
        cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_URL.rsplit("/", 1)[1]
        weights = str(cached) if cached.is_file() else None
    return {"name": extractor.name, "weights": weights or INCEPTION_URL,
            "weights_sha256": file_sha256(weights) if weights else "unknown until downloaded",
            "resize": "torch-fidelity's TensorFlow-1.x-compatible bilinear resize to 299x299 (grey images repeated "
                      "to RGB first)"}


def reference_sidecar(cache_root: str | Path, cache_name: str) -> Path:
    return Path(cache_root) / f"{cache_name}.reference.json"


def record_reference(cache_root: str | Path, cache_name: str, images: Tensor, source: str) -> dict:
    """Write what the reference statistics were computed from beside them; returns it."""
    info = {"source": source, "split": "train", "count": int(images.shape[0]),
            "order": "the first `count` images of the training shards, in shard order",
            "sha256": images_sha256(images)}
    path = reference_sidecar(cache_root, cache_name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(info, indent=1))
    return info


def protocol(spec, n_samples: int | None = None, sampling: str | None = None) -> dict:
    """The full protocol of FIDs scored through ``spec`` (an ``EvalSpec``), with ``n_samples`` generated images
    sampled with the network's forward in ``sampling`` (``bf16`` or ``fp32``; the samplers' arithmetic is fp32)."""
    sidecar = reference_sidecar(spec.cache_root, spec.cache_name)
    if sidecar.is_file():
        reference = json.loads(sidecar.read_text())
    else:  # statistics cached before their record was kept: read the images once to describe them
        reference = record_reference(spec.cache_root, spec.cache_name, spec.reference_images(), spec.reference_source)
    out = {"extractor": extractor_identity(spec.extractor), "reference": reference,
           "samples": spec.num_samples if n_samples is None else n_samples,
           "noise": {"seed": spec.seed, "scheme": NOISE_SCHEME}, "pixels": PIXELS,
           "statistics": "torch-fidelity 2048-d pool features (the classifier: its embedding); FID from their mean "
                         "and covariance; KID unbiased, subsets of min(1000, n)"}
    if sampling is not None:
        out["sampling"] = f"network forward in {sampling}, sampler arithmetic in fp32"
    return out


def describe(p: dict) -> str:
    """One line of the protocol for people."""
    e, r = p["extractor"], p["reference"]
    return (f"{e['name']} (weights sha256 {e['weights_sha256'][:12]}), {p['samples']} samples (noise seed "
            f"{p['noise']['seed']}, {p['noise']['scheme']}) against {r['count']} {r['split']} images of {r['source']} "
            f"(sha256 {r['sha256'][:12]}); {e['resize']}" + (f"; {p['sampling']}" if "sampling" in p else ""))
