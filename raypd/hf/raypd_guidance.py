"""The guidance-weight input of a guided distillation's student, as a diffusers component.

This file is copied into the ``guidance/`` folder of every exported w-conditioned student, where diffusers loads it
(``trust_remote_code=True``); it imports nothing but torch and diffusers. It holds the student's class embedding
(its labels and its "no class" label) and the embedding of the guidance weight w: Fourier features of w through a
two-layer MLP, added to the class embedding. The exported UNet2DModel takes the sum as its class conditioning
(``class_embed_type="identity"``), which its time embedding then adds, as raypd's network does.
"""

import math

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn
from torch.nn import functional as F


class GuidanceEmbedding(ModelMixin, ConfigMixin):
    """(class labels [B], guidance weights w [B]) -> the UNet's class conditioning [B, embedding_dim]."""

    @register_to_config
    def __init__(self, num_classes: int, num_embeddings: int, embedding_dim: int, frequencies: int = 6):
        super().__init__()
        self.classes = nn.Embedding(num_embeddings, embedding_dim)
        self.guidance = nn.Sequential(nn.Linear(2 * frequencies, embedding_dim), nn.SiLU(),
                                      nn.Linear(embedding_dim, embedding_dim))

    def features(self, w: torch.Tensor) -> torch.Tensor:
        """sin and cos of w * (pi/4) * 2^(k/2), k < frequencies (fp32)."""
        k = torch.arange(self.config.frequencies, device=w.device, dtype=torch.float32)
        angles = w.float()[:, None] * (math.pi / 4) * torch.exp2(k / 2)[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    def forward(self, labels: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        weight = self.classes.weight
        return F.embedding(labels, weight) + self.guidance(self.features(w).to(weight.dtype))
