"""From the configured source to shard URLs: raw data sets are written as shards once, then read like any.

Local sources (scikit-learn's digits, MNIST, CIFAR, npz, image folders) go through the same shard
writer and the same reader a cluster uses, so local mode exercises the production data path.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import tempfile
from pathlib import Path

import numpy as np

from raypd.config import DataConfig
from raypd.data.shards import DataError, expand_urls

SHARDS_PER_DATA_SET = 16
"""Small data sets are cut into at least this many shards, so several ranks and workers can share them."""


def digits_npz(path: Path) -> Path:
    """scikit-learn's bundled 8x8 digits (0..16 grey levels) as uint8 arrays in an .npz."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = np.round(np.asarray(bunch.images) * (255.0 / 16.0)).astype(np.uint8)
    np.savez(path, x=x, y=np.asarray(bunch.target, dtype=np.int64))
    return path


def training_shards(cfg: DataConfig, data_root: Path, *, seed: int = 0, readers: int = 1) -> list[str]:
    """Shard URLs of the training split; writes them under ``data_root`` first when the source is raw.

    ``readers``: ranks x loader processes that will read them; a raw source is cut into at least that
    many shards, so each reader has one."""
    if cfg.source == "shards":
        return expand_urls(cfg.shards)
    from raypd.data.sources import open_source
    from raypd.data.writer import write_shards

    # the input files are part of the name, so pointing a run at other files never reuses stale shards
    origin = hashlib.sha1(f"{Path(cfg.path).resolve() if cfg.path else ''}|{cfg.labels_path}".encode()).hexdigest()[:8]
    count = max(SHARDS_PER_DATA_SET, readers)
    suffix = f"-{count}shards" if count > SHARDS_PER_DATA_SET else ""
    out = data_root / f"{cfg.source}-{cfg.resolution}px-{cfg.channels}ch-{origin}{suffix}"
    if not (out / "manifest.json").is_file():
        with tempfile.TemporaryDirectory() as tmp:
            if cfg.source == "digits":
                # the temporary .npz is how it is read, not what it is: the manifest names the data set
                source = dataclasses.replace(open_source("npz", digits_npz(Path(tmp) / "digits.npz")), kind="digits",
                                             path="scikit-learn's load_digits (1,797 handwritten digits, 8x8)")
            else:
                source = open_source(cfg.source, cfg.path, cfg.labels_path or None)
            if len(source) < count:
                raise DataError(f"data.source={cfg.source}: {len(source)} images cannot fill a shard for each of the "
                                f"{count} readers (dist.workers x data.loader_workers); use fewer")
            shard_size = min(5000, max(1, math.ceil(len(source) / count)))
            write_shards(source, out, resolution=cfg.resolution, channels=cfg.channels, shard_size=shard_size,
                         seed=seed)
    return expand_urls(str(out))
