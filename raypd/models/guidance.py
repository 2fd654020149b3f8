"""Classifier-free guidance inside the network (Meng et al. 2023, "On Distillation of Guided Diffusion Models").

A guided teacher is a class-conditional network trained with label dropout: one extra class embedding, the
"no class" label, stands for the unconditional model. Its guided prediction at weight w combines two forwards,

    x_hat_w = (1 + w) x_hat(z, c) - w x_hat(z, no class).

A w-conditioned student takes w as an input instead and makes the guided prediction in one forward. Its w
enters where the class does: Fourier features of w, through a two-layer MLP whose last layer starts at zero,
are added to the class embedding (and so to the time embedding every residual block is scaled and shifted by).
A student made from the teacher therefore starts out predicting exactly what the teacher does without guidance.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

GUIDANCE_FREQUENCIES = 6
"""Fourier features of w: sin and cos of w * (pi/4) * 2^(k/2) for k < 6, periods from 8 down to about 1.4, the
scale guidance weights vary on (w in [0, 2] on the digits, [0, 4] in the paper). Finer ones (down to a period of
0.05 with 16 frequencies) only gave the w embedding wiggles to fit, and a first stage's student ended further from
its teacher."""


def guidance_features(w: Tensor, frequencies: int = GUIDANCE_FREQUENCIES) -> Tensor:
    """[B] -> [B, 2 * frequencies] Fourier features (fp32)."""
    k = torch.arange(frequencies, device=w.device, dtype=torch.float32)
    angles = w.float()[:, None] * (math.pi / 4) * torch.exp2(k / 2)[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class GuidedClassEmbedding(nn.Embedding):
    """The UNet's class embedding (same ``weight``, so the teacher's weights load into it) plus an embedding of w.

    diffusers' UNet2DModel passes ``class_labels`` straight to its class embedding and adds the result to the
    time embedding; a w-conditioned network is called with (label, w) packed as a float [B, 2] tensor.
    """

    def __init__(self, classes: nn.Embedding):
        weight = classes.weight
        super().__init__(classes.num_embeddings, classes.embedding_dim, device=weight.device, dtype=weight.dtype)
        dim = classes.embedding_dim
        self.guidance = nn.Sequential(nn.Linear(2 * GUIDANCE_FREQUENCIES, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.guidance.to(device=weight.device, dtype=weight.dtype)
        if weight.device.type != "meta":
            with torch.no_grad():
                self.weight.copy_(weight)
                self.guidance[-1].weight.zero_()
                self.guidance[-1].bias.zero_()

    @property
    def frequencies(self) -> int:
        """The Fourier frequencies of w this embedding reads (its first layer's width says)."""
        return self.guidance[0].in_features // 2

    def forward(self, packed: Tensor) -> Tensor:
        labels, w = packed[:, 0].round().long(), packed[:, 1]
        features = guidance_features(w, self.frequencies).to(self.weight.dtype)
        return F.embedding(labels, self.weight) + self.guidance(features)


def fit_frequencies(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Give each w embedding of ``model`` the frequency count of the weights in ``state`` it is about to load (a
    network saved when raypd embedded w with 16 frequencies), so they load and it samples as it did."""
    for name, module in model.named_modules():
        weight = state.get(f"{name}.guidance.0.weight")
        if isinstance(module, GuidedClassEmbedding) and weight is not None and weight.shape[1] != 2 * module.frequencies:
            first = module.guidance[0]
            module.guidance[0] = nn.Linear(weight.shape[1], first.out_features, device=first.weight.device,
                                           dtype=first.weight.dtype)


def takes_guidance(state: dict) -> bool:
    """Whether a network's state dict is a w-conditioned network's (it holds a w embedding)."""
    return any(".class_embedding.guidance." in f".{name}" for name in state)


def pack_labels(y: Tensor, w: Tensor) -> Tensor:
    """(label, w) pairs as the float [B, 2] tensor a :class:`GuidedClassEmbedding` reads (labels stay exact in
    fp32 up to 2^24)."""
    return torch.stack([y.float(), w.float()], dim=1)


def as_weights(w: float | Tensor, like: Tensor) -> Tensor:
    """Guidance weights as a [B] fp32 tensor on ``like``'s device: one weight for every example, or one each."""
    if not isinstance(w, Tensor):
        return torch.full((like.shape[0],), float(w), dtype=torch.float32, device=like.device)
    if w.ndim == 0:
        return w.float().expand(like.shape[0]).to(like.device)
    if w.shape != (like.shape[0],):
        raise ValueError(f"w must be a number or have shape [{like.shape[0]}], got {list(w.shape)}")
    return w.float().to(like.device)


def combine(x_cond: Tensor, x_uncond: Tensor, w: Tensor) -> Tensor:
    """The guided prediction (1 + w) x_cond - w x_uncond, w per example ([B])."""
    scale = w.to(x_cond.dtype).reshape(-1, *([1] * (x_cond.ndim - 1)))
    return x_cond + scale * (x_cond - x_uncond)
