import pytest
import torch

from raypd.config import DataConfig, load_config
from raypd.data import load_digits
from raypd.diffusion import diffuse
from raypd.diffusion.params import output_target
from raypd.models import Denoiser, build_denoiser, count_parameters


class Oracle(torch.nn.Module):
    """A backbone that outputs the exact target of a parameterization for known (x, eps)."""

    def __init__(self, x, eps, param):
        super().__init__()
        self.x, self.eps, self.param = x, eps, param

    def forward(self, z, logsnr, y=None):
        return output_target(self.x, self.eps, logsnr, self.param)


@pytest.mark.parametrize("param", ["eps", "x", "v", "both"])
def test_denoiser_returns_x_hat_and_eps_hat_for_every_parameterization(param):
    g = torch.Generator().manual_seed(0)
    x, eps = torch.rand(3, 2, 4, 4, generator=g) * 2 - 1, torch.randn(3, 2, 4, 4, generator=g)
    lam = torch.tensor([-4.0, 0.5, 5.0])
    den = Denoiser(Oracle(x, eps, param), param)
    x_hat, eps_hat = den.predict(diffuse(x, eps, lam), lam)
    torch.testing.assert_close(x_hat, x, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(eps_hat, eps, rtol=1e-3, atol=1e-3)


def test_built_denoiser_sizes_and_class_conditioning():
    cfg = load_config(None, ["data.num_classes=10", "model.parameterization=both"])
    model = build_denoiser(cfg.model, cfg.data)
    assert model.backbone.conv_out.out_channels == 2  # 'both' doubles the image channels
    out = model(torch.randn(2, 1, 16, 16), torch.zeros(2), torch.tensor([1, 2]))
    assert out.shape == (2, 1, 16, 16)
    assert count_parameters(cfg.model, cfg.data) == sum(p.numel() for p in model.parameters())


def test_digits_are_real_images_in_range():
    x, y = load_digits(DataConfig(resolution=16, channels=3))
    assert x.shape == (1797, 3, 16, 16) and x.dtype == torch.float32
    assert x.min() == -1.0 and x.max() == 1.0 and set(y.tolist()) == set(range(10))
    assert x.mean() < -0.3  # dark background, bright strokes
