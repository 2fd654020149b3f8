import pytest
import torch

from raypd.config import DataConfig, load_config
from raypd.data.prepare import training_shards
from raypd.data.shards import ShardLoader, check_shards
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
    assert model.backbone.unet.conv_out.out_channels == 2  # 'both' doubles the image channels
    out = model(torch.randn(2, 1, 16, 16), torch.zeros(2), torch.tensor([1, 2]))
    assert out.shape == (2, 1, 16, 16)
    assert count_parameters(cfg.model, cfg.data) == sum(p.numel() for p in model.parameters())


def test_local_digits_go_through_the_shard_writer_and_reader(tmp_path):
    cfg = DataConfig(resolution=16, channels=3, num_classes=10, loader_workers=0)
    urls = training_shards(cfg, tmp_path)
    assert len(urls) >= 16
    manifest = check_shards(urls, resolution=16, channels=3, num_classes=10, world_size=2, num_workers=2)
    assert manifest["splits"]["train"]["count"] == 1797 and manifest["source"]["kind"] == "digits"
    batch = next(iter(ShardLoader(urls, batch_size=64, channels=3, num_classes=10, resolution=16)))
    assert batch.x.shape == (64, 3, 16, 16) and batch.x.dtype == torch.float32
    assert batch.x.min() == -1.0 and batch.x.max() == 1.0 and batch.y.dtype == torch.int64
    assert batch.x.mean() < -0.3  # dark background, bright strokes
    assert training_shards(cfg, tmp_path) == urls  # written once, then reused


def test_other_input_files_get_their_own_shards(tmp_path):
    import numpy as np

    for name in ("a", "b"):
        np.savez(tmp_path / f"{name}.npz", x=np.full((20, 8, 8), ord(name), dtype=np.uint8))
    urls_a = training_shards(DataConfig(source="npz", path=str(tmp_path / "a.npz"), resolution=8), tmp_path / "d")
    urls_b = training_shards(DataConfig(source="npz", path=str(tmp_path / "b.npz"), resolution=8), tmp_path / "d")
    assert set(urls_a).isdisjoint(urls_b)
