"""What is evaluated and how: every sampler from the same noise, scored by FID/KID and by its
distance to the teacher's full sampler, with a sample grid per point.

Once per run: the teacher's full-step DDIM (the baseline), its DDIM at every step count the
rounds reach (and optionally its stochastic sampler). After each round: the student at its steps.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import Tensor

from raypd.config import Config
from raypd.data.shards import ShardLoader
from raypd.diffusion.ddim import LogsnrFn
from raypd.eval.classifier import save_classifier, train_classifier
from raypd.eval.fid import Extractor, ImageSet, data_key, reference_name, to_uint8
from raypd.eval.chunks import LABEL_HITS, FullSamples, Point, chunks_of, collect, run_here, sampling_name
from raypd.eval.record import EvalRecord, fingerprint
from raypd.eval.samples import NOISE_BLOCK, save_grid
from raypd.models import Denoiser


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


NOISE_SCHEME = f"blocks-{NOISE_BLOCK}"
"""How the evaluation noise is drawn; part of the record's fingerprint, so records drawn otherwise are set aside."""


class Evaluator:
    def __init__(self, cfg: Config, out: Path, *, device: torch.device, logsnr_fn: LogsnrFn, urls: list[str],
                 manifest: dict | None, teacher: Denoiser, step_counts: list[int], remote=None,
                 teacher_digest: str = ""):
        """``remote``: an object whose ``run(model, chunks)`` yields each chunk's (chunk, uint8 images, features)
        computed elsewhere (the Ray tasks); None computes them here, a chunk at a time. ``teacher_digest`` (the
        teacher's weights digest) keeps an evaluation record in ``out/eval``: points scored before under the
        same set-up are reused, not sampled again."""
        e, d = cfg.eval, cfg.data
        self.cfg, self.out, self.device, self.logsnr_fn, self.urls = cfg, out, device, logsnr_fn, list(urls)
        self.shape = (d.channels, d.resolution, d.resolution)
        from raypd.eval.setup import fid_setup

        self.spec = fid_setup(cfg, urls, manifest, out)
        self.extractor, self.reference = self.spec.extractor, self.spec.reference()
        self.full_steps = e.reference_steps or cfg.teacher.sampling_steps
        self.remote = remote
        self.sampling = (sampling_name(e.precision, gpu=bool(getattr(remote, "use_gpu", False))) if remote is not None
                         else sampling_name(e.precision, gpu=device.type == "cuda", device=device))
        self.record = None
        if teacher_digest:
            plain = cfg.to_dict()
            # the same samples at any chunk size; an unguided run's record is the one it kept before guidance existed
            settings = {k: v for k, v in plain["eval"].items() if k != "chunk_size" and (k != "guidance" or v)}
            self.record = EvalRecord(out / "eval", fingerprint(
                eval=settings, diffusion=plain["diffusion"], spec=self.spec.identity(), teacher=teacher_digest,
                full_steps=self.full_steps, noise=NOISE_SCHEME, sampling=self.sampling))
        self.weights = cfg.guidance_weights()
        self.full: dict[float | None, FullSamples] = {}
        self.rows: list[dict] = []
        fresh = [w for w in self.weights if not self._full_recorded(w)]
        if fresh:
            for stale in (out / "eval").glob("teacher-full-*.npy"):  # another set-up's: never read again
                if not any(stale.name == self._full_name(w) for w in self.weights if w not in fresh):
                    stale.unlink()
        for w in self.weights:
            self.full[w] = FullSamples(out / "eval" / self._full_name(w))
            key = f"teacher_ddim-{self.full_steps}{_wkey(w)}"
            if w in fresh:
                point = self.generate(teacher, self.full_steps, write_full=True, w=w)
                self.rows.append(self.point(key, lambda w=w, point=point: self.score(
                    "teacher_ddim", self.full_steps, point, w), fresh=True))
            else:
                self.rows.append(self.point(key, None))
            for n in sorted(set(step_counts), reverse=True):
                if n != self.full_steps:  # a guided distillation's first student samples in the full count
                    self.rows.append(self.point(f"teacher_ddim-{n}{_wkey(w)}", lambda n=n, w=w: self.score(
                        "teacher_ddim", n, self.generate(teacher, n, w=w), w)))
                if e.stochastic:
                    self.rows.append(self.point(f"teacher_stochastic-{n}{_wkey(w)}", lambda n=n, w=w: self.score(
                        "teacher_stochastic", n, self.generate(teacher, n, sampler="stochastic", w=w), w)))

    def _full_name(self, w: float | None) -> str:
        tag = self.record.fingerprint if self.record else "unrecorded"
        return f"teacher-full-{tag}{_wkey(w)}.npy"

    def _full_recorded(self, w: float | None) -> bool:
        """Whether the teacher's full sampler at ``w`` was scored before and its images are still on disk."""
        e = self.cfg.eval
        return (self.record is not None and self.record.get(f"teacher_ddim-{self.full_steps}{_wkey(w)}") is not None
                and FullSamples(self.out / "eval" / self._full_name(w)).exists((e.num_samples, *self.shape)))

    def point(self, key: str, make, fresh: bool = False) -> dict:
        """The row of one point: from the record when it was scored before (and ``fresh`` is false), else made
        by ``make()`` and recorded."""
        row = None if fresh or self.record is None else self.record.get(key)
        if row is not None:
            log(f"[eval] {row['sampler']} at {row['steps']} steps: FID {row['fid']:.2f} (scored before; from "
                f"{self.record.directory / 'record.json'})")
            return row
        row = make()
        if self.record is not None:
            self.record.put(key, row)
        return row

    def generate(self, model: Denoiser, n_steps: int, *, sampler: str = "ddim", write_full: bool = False,
                 w: float | None = None) -> Point:
        """A point's chunks (here, or on the Ray tasks), folded in as they come; ``w``: guided at that weight, its
        distance measured to the teacher's full sampler at the same weight."""
        e = self.cfg.eval
        chunks = chunks_of(self.cfg, sampler, n_steps, self.extractor, guidance=w)
        if self.remote is not None:
            results = self.remote.run(model, chunks)
        else:
            results = run_here(model, chunks, logsnr_fn=self.logsnr_fn, device=self.device)
        every, folded = max(1, len(chunks) // 10), []

        def progress(done: int, n: int) -> None:
            folded.append(done)
            if len(chunks) > 1 and (len(folded) % every == 0 or done == n):
                log(f"[eval] {sampler} at {n_steps} steps{_wtext(w)}: {done}/{n} samples")

        return collect(results, n=e.num_samples, shape=self.shape, grid_size=e.grid_size, full=self.full.get(w),
                       write_full=write_full, progress=progress)

    def score(self, sampler: str, steps: int, point: Point, w: float | None = None, **extra) -> dict:
        """Metrics, distance to the full sampler and a grid for one (sampler, steps[, guidance weight]) point; a
        class-conditional point scored by the classifier also gets the share of samples read as their label."""
        e = self.cfg.eval
        metrics = self.spec.score(features=point.features, reference=self.reference, sampling=self.sampling)
        save_grid(point.grid, self.out / "grids" / f"{sampler}-{steps:04d}steps{_wkey(w)}.png",
                  title=f"{sampler.replace('_', ' ')}, {steps} steps{_wtext(w)}")
        row = {"sampler": sampler, "steps": steps, **({} if w is None else {"guidance": w}), **extra, **metrics,
               "seed": e.seed, "rmse_to_full": point.rmse_to_full}
        if LABEL_HITS in point.features:
            row["label_accuracy"] = float(point.features[LABEL_HITS].mean())
        accuracy = f", label accuracy {row['label_accuracy']:.3f}" if "label_accuracy" in row else ""
        log(f"[eval] {sampler} at {steps} steps{_wtext(w)}: FID {row['fid']:.2f} ({row['extractor']}, "
            f"{row['n_samples']} samples), RMSE to the full sampler {row['rmse_to_full']:.4f}{accuracy}")
        return row

    def student(self, model: Denoiser, n_steps: int, round_index: int, digest: str = "", *,
                sampler: str = "ddim") -> list[dict]:
        """The round's student at its steps with its method's ``sampler``, at every guidance weight (``digest``: its
        weights' digest, the key it is recorded under)."""
        rows = []
        for w in self.weights:
            make = lambda w=w: self.score("distilled", n_steps,  # noqa: E731
                                          self.generate(model, n_steps, sampler=sampler, w=w), w, round=round_index)
            rows.append(self.point(f"distilled-{n_steps}-round{round_index}-{digest[:16]}{_wkey(w)}", make)
                        if digest else make())
        return rows


def _wkey(w: float | None) -> str:
    return "" if w is None else f"-w{w:g}"


def _wtext(w: float | None) -> str:
    return "" if w is None else f", guidance w={w:g}"
