"""The FID set-up of a run, built once: the feature extractor, the reference images behind the cached
statistics, where that cache lives, and the fixed noise every sampler starts from.

The driver's evaluator, a sweep trial scoring its student in another process, and ``raypd fid`` all
score through this one description; it is plain data, so it travels to Ray workers and Tune trials.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from raypd.config import Config
from raypd.data.shards import ShardLoader
from raypd.eval.classifier import save_classifier, train_classifier
from raypd.eval.fid import (Extractor, ImageSet, data_key, fidelity, fidelity_from_features, reference_name,
                            to_uint8)


@dataclass(frozen=True)
class EvalSpec:
    extractor: Extractor
    reference_urls: tuple[str, ...]
    reference_count: int
    channels: int
    resolution: int
    cache_root: str
    cache_name: str
    num_samples: int
    seed: int
    kid: bool = True
    prc: bool = False
    reference_source: str = ""
    """What the reference images are (the data set's kind and path, from its manifest), for the FID protocol."""

    def reference_images(self) -> Tensor:
        """The reference images, uint8 [N, C, H, W]: the first ``reference_count`` of the training shards."""
        return read_images(list(self.reference_urls), self.reference_count, channels=self.channels,
                           resolution=self.resolution)

    def reference(self) -> ImageSet:
        """The reference images (read only when the cached statistics are missing; reading them records their
        digest beside the statistics)."""
        from raypd.eval.protocol import record_reference

        def load() -> Tensor:
            images = self.reference_images()
            record_reference(self.cache_root, self.cache_name, images, self.reference_source)
            return images

        return ImageSet(self.reference_count, load, rgb=self.extractor.kind == "inception")

    def ensure_reference(self) -> None:
        """The reference statistics in the run's cache, computed now when missing: a run whose points all came from
        elsewhere (the teacher's cache) still leaves them for its sweep trials and ``raypd fid``."""
        from raypd.eval.fid import _fidelity_kwargs, _reference_features

        kwargs = _fidelity_kwargs(self.extractor, kid=self.kid, prc=self.prc, n=self.reference_count)
        _reference_features(self.reference(), kwargs, Path(self.cache_root), self.cache_name)

    def protocol(self, n_samples: int | None = None, sampling: str | None = None) -> dict:
        """The FID protocol of numbers scored through this set-up (``raypd.eval.protocol``)."""
        from raypd.eval.protocol import protocol

        return protocol(self, n_samples, sampling)

    def score(self, samples: Tensor | None = None, *, features: dict[str, Tensor] | None = None,
              reference: ImageSet | None = None, kid: bool | None = None, prc: bool | None = None,
              sampling: str | None = None) -> dict:
        """Metrics of generated images ([-1, 1]), or of their features computed elsewhere (``sampling``: the
        precision the network sampled them in, for the protocol record)."""
        where = dict(cache_root=Path(self.cache_root), cache_name=self.cache_name,
                     kid=self.kid if kid is None else kid, prc=self.prc if prc is None else prc)
        reference = reference or self.reference()
        if features is not None:
            result = fidelity_from_features(features, reference, self.extractor, **where)
        else:
            result = fidelity(samples, reference, self.extractor, **where)
        return {**result, "protocol": self.protocol(result["n_samples"], sampling)}

    def with_locations(self, where) -> "EvalSpec":
        """The same set-up with its files (extractor weights, reference shards, statistics cache) passed through
        ``where``: bucket URIs for a process elsewhere, local copies of them in that process."""
        weights = where(self.extractor.weights) if self.extractor.weights else self.extractor.weights
        return dataclasses.replace(self, extractor=dataclasses.replace(self.extractor, weights=weights),
                                   reference_urls=tuple(where(u) for u in self.reference_urls),
                                   cache_root=where(self.cache_root))

    def identity(self) -> dict[str, Any]:
        """What decides the scores, without where the files live: the extractor and its weights' digest, the
        reference set's name (data set, resolution, extractor, count) and the sampling settings. A run moved to
        another directory or bucket keeps the same identity, so its evaluation record still applies."""
        from raypd.eval.protocol import extractor_identity

        extractor = {k: v for k, v in extractor_identity(self.extractor).items() if k != "weights"}
        return {"extractor": extractor, "reference": self.cache_name, "channels": self.channels,
                "resolution": self.resolution, "num_samples": self.num_samples, "seed": self.seed, "kid": self.kid,
                "prc": self.prc}

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["reference_urls"] = list(self.reference_urls)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EvalSpec":
        return cls(**{**data, "extractor": Extractor(**data["extractor"]),
                      "reference_urls": tuple(data["reference_urls"])})


def fid_setup(cfg: Config, urls: list[str], manifest: dict | None, run: Path) -> EvalSpec:
    """The run's FID set-up (training the classifier extractor on first use)."""
    extractor = obtain_extractor(cfg, urls, manifest, run / "eval")
    images, cache_name = reference_set(cfg, urls, manifest, extractor)
    e, d = cfg.eval, cfg.data
    return EvalSpec(extractor, tuple(urls), len(images), d.channels, d.resolution,
                    str((run / "eval" / "fid-cache").resolve()), cache_name, e.num_samples, e.seed, e.kid,
                    e.precision_recall, reference_source=source_name(manifest, urls))


def source_name(manifest: dict | None, urls: list[str]) -> str:
    """The data set behind the shards: its manifest's source (kind and path), else the shards themselves."""
    source = (manifest or {}).get("source")
    if isinstance(source, dict):
        where = source.get("path") or ""
        return f"{source.get('kind', 'unknown')}{' ' + where if where else ''} (shards {urls[0]}, ...)"
    return f"shards {urls[0]}" + (f" ... {urls[-1]}" if len(urls) > 1 else "")


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def read_images(urls: list[str], count: int, *, channels: int, resolution: int) -> Tensor:
    """The first ``count`` training images, as uint8 [N, C, R, R] (PNG shards decode exactly)."""
    loader = ShardLoader(urls, batch_size=1, channels=channels, num_classes=0, resampled=False,
                         shuffle_buffer=1, resolution=resolution)
    images = []
    for batch in loader:
        images.append(to_uint8(batch.x))
        if len(images) == count:
            break
    return torch.cat(images)


def obtain_extractor(cfg: Config, urls: list[str], manifest: dict | None, directory: Path) -> Extractor:
    """Inception as configured, or the data set's classifier (trained here on first use, then cached)."""
    key = data_key(manifest, urls)
    if cfg.eval.extractor == "inception":
        return Extractor("inception", cfg.eval.inception_weights or None)
    path = directory / f"classifier-{key}-{cfg.data.resolution}px"
    if not (path / "meta.json").is_file():
        d = cfg.data
        classes = (manifest or {}).get("num_classes", d.num_classes)
        log(f"[eval] training the classifier feature extractor ({cfg.eval.classifier_updates} updates)")
        loader = ShardLoader(urls, batch_size=64, channels=d.channels, num_classes=classes, resampled=True,
                             random_flip=d.random_flip, seed=cfg.eval.seed, resolution=d.resolution)
        net, accuracy = train_classifier(iter(loader), channels=d.channels, num_classes=classes,
                                         resolution=d.resolution, updates=cfg.eval.classifier_updates,
                                         seed=cfg.eval.seed)
        save_classifier(net, path, {"data_key": key, "train_accuracy": accuracy})
        log(f"[eval] classifier training accuracy {accuracy:.3f}")
    return Extractor("classifier", str(path), tag=key)


def reference_set(cfg: Config, urls: list[str], manifest: dict | None, extractor: Extractor) -> tuple[ImageSet, str]:
    """The training images behind the reference statistics (read only on a cache miss) and their cache name."""
    d = cfg.data
    available = (manifest or {}).get("splits", {}).get("train", {}).get("count", cfg.eval.reference_samples)
    count = min(cfg.eval.reference_samples, available)
    images = ImageSet(count, lambda: read_images(urls, count, channels=d.channels, resolution=d.resolution),
                      rgb=extractor.kind == "inception")
    return images, reference_name(data_key(manifest, urls), d.resolution, extractor, count)
