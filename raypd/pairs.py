"""The Denoising Student's training pairs (Luhman & Luhman 2021): noises and the teacher's deterministic DDIM
samples of them, generated once and kept as WebDataset shards in the run.

The noise is its own stream of the run's seed (never the evaluation noise), drawn in blocks, so any slice of it
is made without the rest: a Ray task samples its blocks, the driver writes the shards. Each shard sample is the
teacher's image (an 8-bit PNG, as a data set's images are), its class label and its noise (``z.npy``, float32).
The folder is named by what made it (teacher weights, pair count, steps, seed); a run that resumes, or reruns,
finds it and samples nothing again.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from raypd.config import Config
from raypd.data.shards import expand_urls, read_manifest
from raypd.data.sources import Source
from raypd.data.writer import MANIFEST, write_shards
from raypd.eval.samples import NOISE_BLOCK, PAIR_STREAM, pair_noise, sample_pairs
from raypd.models import Denoiser

def pairs_folder(out: Path, cfg: Config, teacher_digest: str, count: int) -> Path:
    key = hashlib.sha256(f"{teacher_digest}:{count}:{cfg.distill.start_steps}:{cfg.run.seed}:"
                         f"{cfg.eval.precision}".encode()).hexdigest()[:12]
    return out / "pairs" / f"{count}x{cfg.distill.start_steps}steps-{key}"


def shard_urls(folder: Path) -> list[str]:
    manifest = read_manifest([str(folder / "train-000000.tar")])
    names = [s["name"] for s in manifest["splits"]["train"]["shards"]]
    return expand_urls([str(folder / name) for name in names])


def ensure_pairs(cfg: Config, out: Path, teacher: Denoiser, teacher_digest: str, *, count: int, device: torch.device,
                 remote=None, log=lambda line: print(line, file=sys.stderr, flush=True)) -> list[str]:
    """The URLs of ``count`` pairs' shards: found in the run, or sampled (``remote``: an object whose
    ``run(teacher, blocks)``
    yields each (start, stop, uint8 images) block sampled elsewhere, the Ray tasks) and written."""
    folder = pairs_folder(out, cfg, teacher_digest, count)
    if (folder / MANIFEST).is_file():
        log(f"[pairs] reusing the {count} pairs in {folder}")
        return shard_urls(folder)
    n, d = count, cfg.data
    blocks = [(lo, min(n, lo + NOISE_BLOCK)) for lo in range(0, n, NOISE_BLOCK)]
    images = torch.empty(n, d.channels, d.resolution, d.resolution, dtype=torch.uint8)
    where = f"{remote.workers} Ray task(s) at a time" if remote is not None else "in this process"
    with tqdm(total=n, desc=f"[pairs] teacher DDIM, {cfg.distill.start_steps} steps, {where}", unit="pair",
              file=sys.stderr) as bar:
        made = remote.run(teacher, blocks) if remote is not None else \
            ((lo, hi, sample_pairs(teacher, cfg, lo, hi, device)) for lo, hi in blocks)
        for lo, hi, x in made:
            images[lo:hi] = x
            bar.update(hi - lo)
    z, y = pair_noise(cfg, 0, n)
    pixels, noise = images.permute(0, 2, 3, 1).numpy(), z.numpy()
    labels = None if y is None else y.tolist()
    source = Source("pairs", str(folder), n, read=lambda i: (pixels[i], None if labels is None else labels[i]),
                    num_classes=d.num_classes, noise=lambda i: noise[i],
                    extra={"teacher_sha256": teacher_digest, "sampler": f"DDIM, {cfg.distill.start_steps} steps",
                           "noise": f"stream '{PAIR_STREAM}' of run.seed {cfg.run.seed}"})
    readers = max(1, cfg.dist.workers) * max(1, cfg.data.loader_workers)
    write_shards(source, folder, shard_size=-(-n // max(8, 2 * readers)), seed=cfg.run.seed, progress=False)
    log(f"[pairs] wrote {n} pairs to {folder}")
    return shard_urls(folder)
