"""Models: the Denoiser wrapper and its backbones."""

from raypd.models.denoiser import Backbone, Denoiser
from raypd.models.build import build_denoiser, count_parameters

__all__ = ["Backbone", "Denoiser", "build_denoiser", "count_parameters"]
