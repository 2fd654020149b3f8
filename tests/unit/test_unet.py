"""Unit tests for raypd.models.unet.UNet."""

import pytest
import torch

from raypd.models.unet import UNet

TINY = dict(in_channels=1, out_channels=2, resolution=16, ch=32, ch_mult=(1, 2),
            num_res_blocks=1, attn_resolutions=(8,), dropout=0.1)

CIFAR10 = dict(in_channels=3, out_channels=3, resolution=32, ch=256, ch_mult=(1, 1, 1),
               num_res_blocks=3, attn_resolutions=(8, 16))

IMAGENET64 = dict(in_channels=3, out_channels=6, resolution=64, ch=192, ch_mult=(1, 2, 3, 4),
                  num_res_blocks=3, attn_resolutions=(8, 16, 32), num_classes=1000)


def _tiny(**overrides) -> UNet:
    torch.manual_seed(0)
    return UNet(**{**TINY, **overrides})


def _unzero(model: UNet) -> None:
    """Perturb every zero-initialised conv (output layer, res-block conv2, attention proj).

    The output layer alone is not enough: conditioning enters only through the res
    blocks, whose zero-init conv2 blocks it, so a fresh net ignores logsnr and y.
    """
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d) and not module.weight.any():
                module.weight.normal_(0.0, 0.05)
                module.bias.normal_(0.0, 0.05)


def _inputs(batch: int = 2):
    gen = torch.Generator().manual_seed(1)
    return torch.randn(batch, 1, 16, 16, generator=gen), torch.linspace(-5.0, 5.0, batch)


@pytest.mark.parametrize("resblock_updown", [True, False])
def test_forward_backward_shapes_and_finite_grads(resblock_updown):
    model = _tiny(resblock_updown=resblock_updown).train()
    _unzero(model)
    z, logsnr = _inputs()
    z.requires_grad_(True)
    out = model(z, logsnr)
    assert out.shape == (2, 2, 16, 16)
    out.square().mean().backward()
    assert torch.isfinite(z.grad).all()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name


def test_fresh_network_outputs_exact_zeros():
    model = _tiny().eval()
    z, logsnr = _inputs()
    assert torch.equal(model(z, logsnr), torch.zeros(2, 2, 16, 16))


def test_class_conditioning_changes_output_and_label_checks():
    model = _tiny(num_classes=10).eval()
    _unzero(model)
    z, logsnr = _inputs()
    z, logsnr = z[:1].expand(2, -1, -1, -1), logsnr[:1].expand(2)
    out = model(z, logsnr, torch.tensor([3, 7]))
    assert not torch.allclose(out[0], out[1])
    with pytest.raises(ValueError, match="class label"):
        model(z, logsnr)
    with pytest.raises(ValueError, match="unconditional"):
        _tiny().eval()(z, logsnr, torch.tensor([3, 7]))


def test_logsnr_conditioning_changes_output():
    model = _tiny().eval()
    _unzero(model)
    z, _ = _inputs()
    z = z[:1].expand(2, -1, -1, -1)
    out = model(z, torch.tensor([-3.0, 3.0]))
    assert not torch.allclose(out[0], out[1])
    # Outside [-20, 20] the input is clamped, so the outputs must coincide.
    clamped = model(z, torch.tensor([25.0, 30.0]))
    torch.testing.assert_close(clamped[0], clamped[1])


@pytest.mark.parametrize("config, low, high", [(CIFAR10, 50e6, 70e6),
                                               (IMAGENET64, 270e6, 320e6)])
def test_paper_parameter_counts(config, low, high):
    with torch.device("meta"):
        model = UNet(**config)
    count = sum(p.numel() for p in model.parameters())
    assert low <= count <= high, count


def test_set_dropout_zero_makes_train_forward_deterministic():
    model = _tiny(dropout=0.5).train()
    _unzero(model)
    z, logsnr = _inputs()
    assert not torch.allclose(model(z, logsnr), model(z, logsnr))
    model.set_dropout(0.0)
    torch.testing.assert_close(model(z, logsnr), model(z, logsnr), rtol=0, atol=0)


@pytest.mark.parametrize("overrides, match", [
    (dict(resolution=15), "divisible"),
    (dict(attn_resolutions=(4,)), "never reached"),
    (dict(ch=48), "GroupNorm"),
    (dict(ch_mult=()), "ch_mult"),
])
def test_constructor_validation(overrides, match):
    with pytest.raises(ValueError, match=match):
        _tiny(**overrides)
