"""Evaluation spread over the cluster: Ray tasks sample and extract features chunk by chunk
(``raypd.eval.chunks``); the driver folds the chunks in as they come and computes FID/KID once.

The model travels as a state dict in Ray's object store (put once per point); a chunk is plain
settings, and each task draws its own slice of the fixed noise, so nothing is pickled but tensors
and plain data. At most two chunks per worker are in flight, so finished chunks wait in the object
store only briefly. On GPUs each task holds one GPU, which is what makes 50k samples per point
practical, and runs in a fresh process (Ray's default for GPU tasks, which hands the GPU's memory
back to the training workers afterwards); on CPUs a worker process keeps the last network it built,
so its next chunk of the same point does not build it again.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch
from torch import Tensor

from raypd.config import Config
from raypd.eval.chunks import Chunk, Result
from raypd.models import Denoiser

_BUILT: dict[str, Denoiser] = {}


def _generate_and_extract(config: dict, key: str, state: dict, chunk: dict) -> tuple[Tensor, dict[str, Tensor]]:
    """One task: one chunk's uint8 images and their features."""
    import tempfile
    from pathlib import Path

    from raypd.config import config_from_dict
    from raypd.eval.chunks import generate_chunk
    from raypd.eval.fid import Extractor
    from raypd.storage import fetch

    cfg = config_from_dict(config)
    chunk = Chunk(**chunk)
    extractor = chunk.extractor
    if extractor.get("weights"):  # a run kept in a bucket: the classifier's weights come from there
        extractor = {**extractor, "weights": fetch(extractor["weights"], Path(tempfile.gettempdir()) / "raypd-fetch")}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return generate_chunk(_built(cfg, key, state, device), chunk, logsnr_fn=cfg.diffusion.logsnr_fn(), device=device,
                          extractor=Extractor(**extractor))


def _built(cfg: Config, key: str, state: dict, device: torch.device) -> Denoiser:
    """The network of ``state``, built once per worker process for consecutive tasks of the same ``key``."""
    from raypd.models import build_denoiser
    from raypd.models.guidance import fit_frequencies, takes_guidance

    model = _BUILT.get(key)
    if model is None:
        _BUILT.clear()
        model = build_denoiser(cfg.model, cfg.data, guidance_input=takes_guidance(state))
        fit_frequencies(model, state)
        model.load_state_dict(state)
        model = _BUILT.setdefault(key, model.to(device).eval())
    return model


def _sample_pairs(config: dict, key: str, state: dict, start: int, stop: int) -> tuple[int, int, Tensor]:
    """One task: the teacher's DDIM samples of pairs ``start:stop``'s noise (uint8)."""
    from raypd.config import config_from_dict
    from raypd.eval.samples import sample_pairs

    cfg = config_from_dict(config)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return start, stop, sample_pairs(_built(cfg, key, state, device), cfg, start, stop, device)


class RayPairs:
    """A method's (noise, teacher sample) pairs sampled by Ray tasks (one GPU each when ``use_gpu``), a block per
    task, at most two per worker in flight."""

    def __init__(self, cfg: Config, *, workers: int, use_gpu: bool):
        import ray

        self.cfg, self.workers = cfg, max(1, workers)
        self._task = ray.remote(num_gpus=1 if use_gpu else 0, num_cpus=1, max_retries=2)(_sample_pairs)

    def run(self, teacher: Denoiser, blocks: list[tuple[int, int]]) -> Iterator[tuple[int, int, Tensor]]:
        import ray

        state = ray.put({k: v.detach().cpu() for k, v in teacher.state_dict().items()})
        config, pending, in_flight = self.cfg.to_dict(), list(reversed(blocks)), []
        try:
            while pending or in_flight:
                while pending and len(in_flight) < 2 * self.workers:
                    lo, hi = pending.pop()
                    in_flight.append(self._task.remote(config, state.hex(), state, lo, hi))
                (ready,), _ = ray.wait(in_flight, num_returns=1)
                in_flight.remove(ready)
                yield ray.get(ready)
        finally:
            for ref in in_flight:
                ray.cancel(ref, force=True)


class RayEvaluation:
    """Chunks as Ray tasks (one GPU each when ``use_gpu``), at most two per worker in flight."""

    def __init__(self, cfg: Config, *, workers: int, use_gpu: bool, mirror=None):
        """``mirror``: the run's bucket mirror, whose copy of the extractor's weights the tasks fetch."""
        import ray

        self.cfg, self.workers, self.mirror, self.use_gpu = cfg, max(1, workers), mirror, use_gpu
        self._task = ray.remote(num_gpus=1 if use_gpu else 0, num_cpus=1, max_retries=2)(_generate_and_extract)

    def run(self, model: Denoiser, chunks: Iterable[Chunk]) -> Iterator[Result]:
        """The chunks' results, in the order they finish."""
        import ray

        state = ray.put({k: v.detach().cpu() for k, v in model.state_dict().items()})
        config = self.cfg.to_dict()
        pending, in_flight = list(chunks), {}
        weights = pending[0].extractor.get("weights") if pending else None
        if self.mirror is not None and weights:
            self.mirror.sync()
            located = self.mirror.locate(weights)
            pending = [Chunk(**{**c.to_dict(), "extractor": {**c.extractor, "weights": located}}) for c in pending]
        pending.reverse()
        try:
            while pending or in_flight:
                while pending and len(in_flight) < 2 * self.workers:
                    chunk = pending.pop()
                    in_flight[self._task.remote(config, state.hex(), state, chunk.to_dict())] = chunk
                (ready,), _ = ray.wait(list(in_flight), num_returns=1)
                images, features = ray.get(ready)
                yield in_flight.pop(ready), images, features
        finally:  # the point was abandoned (an error while folding it in): free the GPUs its tasks hold
            for ref in in_flight:
                ray.cancel(ref, force=True)
