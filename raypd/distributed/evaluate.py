"""Evaluation spread over the cluster: every worker generates its share of the fixed noise and
extracts its samples' features; the driver gathers features and computes FID/KID once.

The model travels as a state dict in Ray's object store (put once per point), the noise as one
tensor; each task builds the network from the run's config, so nothing is pickled but tensors and
plain settings. On GPUs each task holds one GPU, which is what makes 50k samples per point practical.
"""

from __future__ import annotations

import torch
from torch import Tensor

from raypd.config import Config
from raypd.models import Denoiser


def _generate_and_extract(config: dict, state: dict, z: Tensor, y: Tensor | None, n_steps: int,
                          extractor: dict, kid: bool, prc: bool) -> tuple[Tensor, dict[str, Tensor]]:
    """One task: N-step DDIM samples of its noise slice and their features (uint8 samples come back for grids)."""
    from raypd.config import config_from_dict
    from raypd.eval.fid import Extractor, extract_features, to_uint8
    from raypd.eval.samples import sample_ddim
    from raypd.models import build_denoiser

    import tempfile
    from pathlib import Path

    from raypd.storage import fetch

    cfg = config_from_dict(config)
    if extractor.get("weights"):  # a run kept in a bucket: the classifier's weights come from there
        extractor = {**extractor, "weights": fetch(extractor["weights"], Path(tempfile.gettempdir()) / "raypd-fetch")}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_denoiser(cfg.model, cfg.data)
    model.load_state_dict(state)
    model.to(device)
    samples = sample_ddim(model, z, y, n_steps, logsnr_fn=cfg.diffusion.logsnr_fn(), device=device)
    features = extract_features(samples, Extractor(**extractor), kid=kid, prc=prc)
    return to_uint8(samples), {k: v.cpu() for k, v in features.items()}


class RayEvaluation:
    """Generation and feature extraction as ``workers`` Ray tasks (one GPU each when ``use_gpu``)."""

    def __init__(self, cfg: Config, *, workers: int, use_gpu: bool, mirror=None):
        """``mirror``: the run's bucket mirror, whose copy of the extractor's weights the tasks fetch."""
        import ray

        self.cfg, self.workers, self.mirror = cfg, max(1, workers), mirror
        self._task = ray.remote(num_gpus=1 if use_gpu else 0, num_cpus=1, max_retries=2)(_generate_and_extract)

    def run(self, model: Denoiser, z: Tensor, y: Tensor | None, n_steps: int, extractor, *, kid: bool,
            prc: bool) -> tuple[Tensor, dict[str, Tensor]]:
        """(samples in [-1, 1], features) of ``model``'s N-step DDIM from noise ``z``, in the order of ``z``."""
        import ray

        state = ray.put({k: v.detach().cpu() for k, v in model.state_dict().items()})
        config = self.cfg.to_dict()
        weights = extractor.weights
        if self.mirror is not None and weights:
            self.mirror.sync()
            weights = self.mirror.locate(weights)
        ext = {"kind": extractor.kind, "weights": weights, "tag": extractor.tag}
        chunks = torch.arange(z.shape[0]).tensor_split(self.workers)
        refs = [self._task.remote(config, state, z[idx], None if y is None else y[idx], n_steps, ext, kid, prc)
                for idx in chunks if len(idx)]
        parts = ray.get(refs)
        samples = torch.cat([p[0] for p in parts]).float() / 127.5 - 1.0
        features = {k: torch.cat([p[1][k] for p in parts]) for k in parts[0][1]}
        return samples, features
