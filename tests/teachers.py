"""A small denoiser whose output depends on its input, for tests that need a teacher.

A freshly built one has zero-initialised output layers, so every distillation target would be 0.
"""

import torch

from raypd.models import build_denoiser


def perturbed_denoiser(cfg, scale: float = 0.02):
    torch.manual_seed(0)
    model = build_denoiser(cfg.model, cfg.data)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model
