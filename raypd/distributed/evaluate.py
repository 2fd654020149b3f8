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

import sys
from typing import Any, Callable, Iterable, Iterator, TypeVar

import torch
from torch import Tensor

from raypd.config import Config
from raypd.eval.chunks import Chunk, Result
from raypd.models import Denoiser

_BUILT: dict[str, Denoiser] = {}
T = TypeVar("T")


def _generate_and_extract(config: dict, key: str, state: dict, chunk: dict) -> tuple[Tensor, dict[str, Tensor]]:
    """One task: one chunk's uint8 images and their features."""

    from raypd.config import config_from_dict
    from raypd.eval.chunks import generate_chunk
    from raypd.eval.fid import Extractor
    from raypd.storage import fetch

    cfg = config_from_dict(config)
    chunk = Chunk(**chunk)
    extractor = chunk.extractor
    if extractor.get("weights"):  # a run kept in a bucket: the classifier's weights come from there
        extractor = {**extractor, "weights": fetch(extractor["weights"])}
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


RETRIES = 3
"""Times a task whose process or node was lost is submitted again before the work fails."""


def run_tasks(submit: Callable[[T], Any], items: Iterable[T], *, in_flight: int,
              lost: Callable[[T, BaseException], None] | None = None) -> Iterator[tuple[T, Any]]:
    """Every item's task result, in the order they finish, at most ``in_flight`` tasks at once.

    A task whose worker process or node died (a preempted node, the memory monitor) is submitted again, up to
    ``RETRIES`` times, and ``lost`` is told each time; an error raised by the task's own code is not retried. On
    the way out (done, or abandoned by the caller) the tasks still running are cancelled, so they free the GPUs
    they hold."""
    import ray
    from ray.exceptions import NodeDiedError, ObjectLostError, OutOfMemoryError, WorkerCrashedError

    pending, running, tries = list(enumerate(items)), {}, {}
    pending.reverse()
    try:
        while pending or running:
            while pending and len(running) < in_flight:
                index, item = pending.pop()
                running[submit(item)] = index, item
            (ready,), _ = ray.wait(list(running), num_returns=1)
            index, item = running.pop(ready)
            try:
                result = ray.get(ready)
            except (WorkerCrashedError, NodeDiedError, ObjectLostError, OutOfMemoryError) as err:
                tries[index] = tries.get(index, 0) + 1
                if tries[index] > RETRIES:
                    raise
                if lost is not None:
                    lost(item, err)
                pending.append((index, item))
                continue
            yield item, result
    finally:
        for ref in running:
            ray.cancel(ref, force=True)


def _remote(function: Callable, use_gpu: bool):
    import ray

    return ray.remote(num_gpus=1 if use_gpu else 0, num_cpus=1, max_retries=0)(function)


class RayPairs:
    """A method's (noise, teacher sample) pairs sampled by Ray tasks (one GPU each when ``use_gpu``), a block per
    task, at most two per worker in flight."""

    def __init__(self, cfg: Config, *, workers: int, use_gpu: bool, lost: Callable[[str], None] | None = None):
        """``lost``: told what a task was doing each time one is lost and submitted again."""
        self.cfg, self.workers, self.lost = cfg, max(1, workers), lost
        self._task = _remote(_sample_pairs, use_gpu)

    def run(self, teacher: Denoiser, blocks: list[tuple[int, int]]) -> Iterator[tuple[int, int, Tensor]]:
        import ray

        state = ray.put({k: v.detach().cpu() for k, v in teacher.state_dict().items()})
        config = self.cfg.to_dict()
        for _, result in run_tasks(lambda b: self._task.remote(config, state.hex(), state, *b), blocks,
                                   in_flight=2 * self.workers, lost=_told(self.lost, lambda b: f"pairs {b[0]}:{b[1]}")):
            yield result


class RayEvaluation:
    """Chunks as Ray tasks (one GPU each when ``use_gpu``), at most two per worker in flight."""

    def __init__(self, cfg: Config, *, workers: int, use_gpu: bool, mirror=None,
                 lost: Callable[[str], None] | None = None):
        """``mirror``: the run's bucket mirror, whose copy of the extractor's weights the tasks fetch. ``lost``: told
        what a task was doing each time one is lost and submitted again."""
        self.cfg, self.workers, self.mirror, self.use_gpu, self.lost = cfg, max(1, workers), mirror, use_gpu, lost
        self._task = _remote(_generate_and_extract, use_gpu)

    def run(self, model: Denoiser, chunks: Iterable[Chunk]) -> Iterator[Result]:
        """The chunks' results, in the order they finish."""
        import ray

        state = ray.put({k: v.detach().cpu() for k, v in model.state_dict().items()})
        config = self.cfg.to_dict()
        chunks = list(chunks)
        weights = chunks[0].extractor.get("weights") if chunks else None
        if self.mirror is not None and weights:
            self.mirror.sync()
            located = self.mirror.locate(weights)
            chunks = [Chunk(**{**c.to_dict(), "extractor": {**c.extractor, "weights": located}}) for c in chunks]
        for chunk, (images, features) in run_tasks(
                lambda c: self._task.remote(config, state.hex(), state, c.to_dict()), chunks,
                in_flight=2 * self.workers, lost=_told(self.lost, lambda c: f"evaluation at {c.n_steps} steps")):
            yield chunk, images, features


def _told(lost: Callable[[str], None] | None, what: Callable[[Any], str]):
    """``run_tasks``' loss callback that tells ``lost`` what the lost task was doing, and says so on stderr."""
    def told(item, err: BaseException) -> None:
        print(f"[cluster] a task was lost ({what(item)}: {type(err).__name__}); it runs again", file=sys.stderr,
              flush=True)
        if lost is not None:
            lost(what(item))
    return told
