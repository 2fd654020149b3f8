"""What is evaluated and how: every sampler from the same noise, scored by FID/KID and by its
distance to the teacher's full sampler, with a sample grid per point.

Once per run: the teacher's full-step DDIM (the baseline), its DDIM at every step count the
rounds reach (and optionally its stochastic sampler). After each round: the student at its steps.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from raypd.config import Config
from raypd.diffusion.ddim import LogsnrFn
from raypd.eval.chunks import LABEL_HITS, FullSamples, Point, chunks_of, collect, run_here, sampling_name
from raypd.eval.budget import EvalPlan
from raypd.eval.record import EvalRecord, fingerprint
from raypd.eval.samples import NOISE_BLOCK, save_grid
from raypd.eval.setup import fid_setup, log
from raypd.models import Denoiser
from raypd.storage import cache_dir


NOISE_SCHEME = f"blocks-{NOISE_BLOCK}"
"""How the evaluation noise is drawn; part of the record's fingerprint, so records drawn otherwise are set aside."""


class Evaluator:
    def __init__(self, cfg: Config, out: Path, *, device: torch.device, logsnr_fn: LogsnrFn, urls: list[str],
                 manifest: dict | None, teacher: Denoiser, step_counts: list[int], remote=None,
                 teacher_digest: str = ""):
        """``remote``: an object whose ``run(model, chunks)`` yields each chunk's (chunk, uint8 images, features)
        computed elsewhere (the Ray tasks); None computes them here, a chunk at a time. ``teacher_digest`` (the
        teacher's weights digest) keeps an evaluation record in ``out/eval``: points scored before under the
        same set-up are reused, not sampled again; the teacher's points are also kept in this machine's cache
        (``raypd.storage.cache_dir``), where every later run from the same teacher and set-up finds them.

        Building it scores nothing: :meth:`score_teacher` scores the teacher's points."""
        e, d = cfg.eval, cfg.data
        self.cfg, self.out, self.device, self.logsnr_fn, self.urls = cfg, out, device, logsnr_fn, list(urls)
        self.teacher, self.step_counts = teacher, list(step_counts)
        self.shape = (d.channels, d.resolution, d.resolution)
        self.spec = fid_setup(cfg, urls, manifest, out)
        self.extractor, self.reference = self.spec.extractor, self.spec.reference()
        self.plan = EvalPlan.of(cfg)
        self.full_steps = self.plan.full_steps
        self.remote = remote
        self.sampling = (sampling_name(e.precision, gpu=bool(getattr(remote, "use_gpu", False))) if remote is not None
                         else sampling_name(e.precision, gpu=device.type == "cuda", device=device))
        self.record = self.shared = None
        if teacher_digest:
            plain = cfg.to_dict()
            # the same samples at any chunk size or plan (a point's key names its sample count); an unguided run's
            # record is the one it kept before guidance existed
            unkeyed = {"chunk_size", "max_standard_steps", "many_step_samples", "stochastic", "distributed"}
            settings = {k: v for k, v in plain["eval"].items() if k not in unkeyed and (k != "guidance" or v)}
            tag = fingerprint(eval=settings, diffusion=plain["diffusion"], spec=self.spec.identity(),
                              teacher=teacher_digest, full_steps=self.full_steps, noise=NOISE_SCHEME,
                              sampling=self.sampling)
            self.record = EvalRecord(out / "eval", tag)
            self.shared = EvalRecord(cache_dir("teacher-eval", tag), tag)
        self.weights = cfg.guidance_weights()
        self.full: dict[float | None, FullSamples] = {}
        self.rows: list[dict] = []

    def score_teacher(self) -> list[dict]:
        """The teacher's points, each from the run's record, the teacher's cache, or sampled and scored now: its
        full sampler and, at the step counts the students reach, its DDIM (and with ``eval.stochastic`` its
        ancestral sampler), with the plan's sample counts."""
        self.spec.ensure_reference()
        fresh = [w for w in self.weights if not self._full_recorded(w)]
        if fresh:
            for stale in (self.out / "eval").glob("teacher-full-*.npy"):  # another set-up's: never read again
                if not any(stale.name == self._full_name(w) for w in self.weights if w not in fresh):
                    stale.unlink()
        rows = []
        for w in self.weights:
            self.full[w] = FullSamples(self.out / "eval" / self._full_name(w))
            key = self._key("teacher_ddim", self.full_steps, self.plan.num_samples, w)
            if w in fresh:
                point = self.generate(self.teacher, self.full_steps, write_full=True, w=w)
                rows.append(self.point(key, lambda w=w, point=point: self.score(
                    "teacher_ddim", self.full_steps, point, w), fresh=True, teacher=True))
                if self.shared is not None:
                    _copy(self.full[w].path, self.shared.directory / self.full[w].path.name)
            else:
                rows.append(self.point(key, None, teacher=True))
            for sampler, n, k in self.plan.teacher_points(self.step_counts):
                rows.append(self.point(self._key(sampler, n, k, w), lambda s=sampler, n=n, k=k, w=w: self.score(
                    s, n, self.generate(self.teacher, n, sampler=s.removeprefix("teacher_"), w=w, samples=k), w),
                    teacher=True))
        self.rows.extend(rows)
        return rows

    def _key(self, sampler: str, steps: int, samples: int, w: float | None, suffix: str = "") -> str:
        count = "" if self.plan.standard(samples) else f"-n{samples}"
        return f"{sampler}-{steps}{suffix}{count}{_wkey(w)}"

    def _full_name(self, w: float | None) -> str:
        tag = self.record.fingerprint if self.record else "unrecorded"
        return f"teacher-full-{tag}{_wkey(w)}.npy"

    def _full_recorded(self, w: float | None) -> bool:
        """Whether the teacher's full sampler at ``w`` was scored before and its images are still on disk (in the
        run, or in the teacher's cache, from where they are copied into the run)."""
        if self.record is None:
            return False
        key, shape = self._key("teacher_ddim", self.full_steps, self.plan.num_samples, w), (self.plan.num_samples,
                                                                                            *self.shape)
        here = FullSamples(self.out / "eval" / self._full_name(w))
        if self.record.get(key) is not None and here.exists(shape):
            return True
        cached = FullSamples(self.shared.directory / self._full_name(w))
        if self._cached(key) is not None and cached.exists(shape):
            _copy(cached.path, here.path)
            return True
        return False

    def _cached(self, key: str) -> dict | None:
        """A teacher point's row from the teacher's cache, when its grid is there too."""
        row = None if self.shared is None else self.shared.get(key)
        if row is None or not (self.shared.directory / "grids" / row.get("grid", "-")).is_file():
            return None
        return row

    def point(self, key: str, make, fresh: bool = False, teacher: bool = False) -> dict:
        """The row of one point: from the record when it was scored before (and ``fresh`` is false), else made
        by ``make()`` and recorded. A ``teacher`` point is also looked up in, and kept in, the teacher's cache,
        with its grid."""
        row = None if fresh or self.record is None else self.record.get(key)
        where = None if row is None else self.record.directory / "record.json"
        if row is None and teacher and not fresh:
            row = self._cached(key)
            if row is not None:
                _copy(self.shared.directory / "grids" / row["grid"], self.out / "grids" / row["grid"])
                self.record.put(key, row)
                where = self.shared.directory / "record.json"
        if row is not None:
            log(f"[eval] {row['sampler']} at {row['steps']} steps: FID {row['fid']:.2f} (scored before; from "
                f"{where})")
            return row
        row = make()
        if self.record is not None:
            self.record.put(key, row)
        if teacher and self.shared is not None:
            _copy(self.out / "grids" / row["grid"], self.shared.directory / "grids" / row["grid"])
            self.shared.put(key, row)
        return row

    def generate(self, model: Denoiser, n_steps: int, *, sampler: str = "ddim", write_full: bool = False,
                 w: float | None = None, samples: int | None = None) -> Point:
        """A point's chunks (here, or on the Ray tasks), folded in as they come; ``w``: guided at that weight, its
        distance measured to the teacher's full sampler at the same weight; ``samples``: fewer than
        ``eval.num_samples`` (the first of the same noise)."""
        n = samples or self.cfg.eval.num_samples
        chunks = chunks_of(self.cfg, sampler, n_steps, self.extractor, guidance=w, samples=n)
        if self.remote is not None:
            results = self.remote.run(model, chunks)
        else:
            results = run_here(model, chunks, logsnr_fn=self.logsnr_fn, device=self.device)
        every, folded = max(1, len(chunks) // 10), []

        def progress(done: int, total: int) -> None:
            folded.append(done)
            if len(chunks) > 1 and (len(folded) % every == 0 or done == total):
                log(f"[eval] {sampler} at {n_steps} steps{_wtext(w)}: {done}/{total} samples")

        return collect(results, n=n, shape=self.shape, grid_size=self.cfg.eval.grid_size, full=self.full.get(w),
                       write_full=write_full, progress=progress)

    def score(self, sampler: str, steps: int, point: Point, w: float | None = None, **extra) -> dict:
        """Metrics, distance to the full sampler and a grid for one (sampler, steps[, guidance weight]) point; a
        class-conditional point scored by the classifier also gets the share of samples read as their label."""
        e = self.cfg.eval
        metrics = self.spec.score(features=point.features, reference=self.reference, sampling=self.sampling)
        grid = f"{sampler}-{steps:04d}steps{_wkey(w)}.png"
        save_grid(point.grid, self.out / "grids" / grid, title=f"{sampler.replace('_', ' ')}, {steps} steps{_wtext(w)}")
        row = {"sampler": sampler, "steps": steps, **({} if w is None else {"guidance": w}), **extra, **metrics,
               "seed": e.seed, "rmse_to_full": point.rmse_to_full, "grid": grid}
        if LABEL_HITS in point.features:
            row["label_accuracy"] = float(point.features[LABEL_HITS].mean())
        accuracy = f", label accuracy {row['label_accuracy']:.3f}" if "label_accuracy" in row else ""
        few = "" if self.plan.standard(row["n_samples"]) else " (fewer than the standard points: FID reads higher)"
        log(f"[eval] {sampler} at {steps} steps{_wtext(w)}: FID {row['fid']:.2f} ({row['extractor']}, "
            f"{row['n_samples']} samples{few}), RMSE to the full sampler {row['rmse_to_full']:.4f}{accuracy}")
        return row

    def student(self, model: Denoiser, n_steps: int, round_index: int, digest: str = "", *,
                sampler: str = "ddim") -> list[dict]:
        """The round's student at its steps with its method's ``sampler``, at every guidance weight (``digest``: its
        weights' digest, the key it is recorded under), with the plan's sample count (none when it scores no
        point there)."""
        k = self.plan.samples(n_steps)
        if not k:
            log(f"[eval] round {round_index}: its {n_steps}-step student is not scored (eval.many_step_samples=0)")
            return []
        rows = []
        for w in self.weights:
            make = lambda w=w: self.score("distilled", n_steps,  # noqa: E731
                                          self.generate(model, n_steps, sampler=sampler, w=w, samples=k), w,
                                          round=round_index)
            key = self._key("distilled", n_steps, k, w, suffix=f"-round{round_index}-{digest[:16]}")
            rows.append(self.point(key, make) if digest else make())
        return rows


def _copy(source: Path, target: Path) -> None:
    """``source`` copied to ``target`` whole or not at all (a reader never sees part of it)."""
    import shutil

    target.parent.mkdir(parents=True, exist_ok=True)
    staged = target.with_name(f".{target.name}.part{os.getpid()}")
    shutil.copyfile(source, staged)
    os.replace(staged, target)


def _wkey(w: float | None) -> str:
    return "" if w is None else f"-w{w:g}"


def _wtext(w: float | None) -> str:
    return "" if w is None else f", guidance w={w:g}"
