"""raypd's UNet: a diffusers UNet2DModel in the paper's configuration, driven by logsnr."""

import pytest
import torch
from safetensors.torch import load_file

from raypd.checkpoint import load_checkpoint
from raypd.config import ConfigError, DataConfig, ModelConfig, load_config
from raypd.models import build_denoiser, count_parameters
from raypd.models.convert import convert_state
from raypd.models.unet import build_unet, unet_config

GOLDEN = __import__("pathlib").Path(__file__).resolve().parents[1] / "golden"
DATA = DataConfig(resolution=16, channels=1)


def _tiny(data: DataConfig = DATA, **overrides):
    torch.manual_seed(0)
    return build_unet(ModelConfig(**{"parameterization": "both", **overrides}), data)


def _unzero(model) -> None:
    """Perturb every zero-initialised layer: conditioning enters through the residual blocks, whose zeroed last
    conv would otherwise block it."""
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0.0, 0.05)


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
    model = _tiny(DataConfig(resolution=16, channels=1, num_classes=10)).eval()
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


def test_the_network_is_a_stock_unet2dmodel_with_the_papers_blocks():
    from diffusers import UNet2DModel

    cfg = unet_config(ModelConfig(ch_mult=(1, 2, 2), attn_resolutions=(16,)), DataConfig(resolution=32, channels=3))
    assert cfg["down_block_types"] == ["ResnetDownsampleBlock2D", "AttnDownBlock2D", "ResnetDownsampleBlock2D"]
    assert cfg["up_block_types"] == ["ResnetUpsampleBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D"]
    assert cfg["resnet_time_scale_shift"] == "scale_shift" and cfg["out_channels"] == 6
    strided = unet_config(ModelConfig(resblock_updown=False), DATA)
    assert strided["down_block_types"] == ["DownBlock2D", "AttnDownBlock2D"] and strided["downsample_type"] == "conv"
    assert type(_tiny().unet) is UNet2DModel  # noqa: E721 - exactly the stock class, nothing derived


# the paper's networks, counted before raypd built them with diffusers: the same function, the same size
@pytest.mark.parametrize("name, count", [("cifar10.yaml", 60_004_099), ("imagenet64.yaml", 295_904_454),
                                         ("lsun_church128.yaml", 126_175_366), ("lsun_bedroom128.yaml", 126_175_366)])
def test_paper_parameter_counts_are_unchanged(name, count):
    cfg = load_config(GOLDEN.parents[1] / "configs" / name)
    assert count_parameters(cfg.model, cfg.data) == count


def test_set_dropout_zero_makes_train_forward_deterministic():
    model = build_denoiser(ModelConfig(dropout=0.5), DATA).train()
    _unzero(model)
    z, logsnr = _inputs()
    assert not torch.allclose(model(z, logsnr), model(z, logsnr))
    model.set_dropout(0.0)
    torch.testing.assert_close(model(z, logsnr), model(z, logsnr), rtol=0, atol=0)


@pytest.mark.parametrize("overrides, key", [
    (["data.resolution=15"], "model.ch_mult"),
    (["model.attn_resolutions=[4]"], "model.attn_resolutions"),
    (["model.ch=48"], "model.ch"),
    (["model.ch=16"], "model.ch"),
    (["model.ch_mult=[2,2]"], "model.ch_mult"),
    (["model.ch_mult=[1,2,4]", "model.attn_resolutions=[16,4]", "model.head_channels=64"], "model.head_channels"),
])
def test_settings_the_network_cannot_express_are_refused_by_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert err.value.key == key


def test_one_head_per_block_when_head_channels_covers_every_level():
    model = ModelConfig(ch=32, ch_mult=(1, 2), attn_resolutions=(8,), head_channels=128)
    assert unet_config(model, DATA)["attention_head_dim"] is None  # 64 channels at 8 px and in the middle: one head each
    assert unet_config(ModelConfig(head_channels=16), DATA)["attention_head_dim"] == 16
    # 48 divides neither 32 nor 64, but gives each one head (the paper's max(1, channels // 48))
    wide = ModelConfig(ch=32, ch_mult=(1, 2), attn_resolutions=(16, 8), head_channels=48)
    assert unet_config(wide, DATA)["attention_head_dim"] is None


def test_a_checkpoint_whose_settings_cannot_be_built_is_a_checkpoint_error(tmp_path):
    import json
    import shutil

    from raypd.checkpoint import CheckpointError

    path = tmp_path / "former"
    shutil.copytree(GOLDEN / "legacy-unet-updown", path)
    meta = json.loads((path / "meta.json").read_text())
    meta["model"]["ch_mult"] = [2, 2]
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"cannot be built \(model.ch_mult: must start with 1"):
        load_checkpoint(path)


@pytest.mark.parametrize("name", ["updown", "strided"])
def test_checkpoints_of_the_former_unet_load_and_compute_the_same(name):
    """Checkpoints written by raypd's former hand-written UNet (class-conditional 'both' with BigGAN resampling;
    'eps' with strided resampling; two heads), with its outputs on fixed inputs, saved by that version."""
    model, meta = load_checkpoint(GOLDEN / f"legacy-unet-{name}")
    want = load_file(str(GOLDEN / f"legacy-unet-{name}.safetensors"))
    with torch.no_grad():
        got = model.eval()(want["z"], want["logsnr"], want.get("y"))
    scale = want["x_hat"].abs().max()
    assert (got - want["x_hat"]).abs().max() <= 1e-5 * scale  # float32 rounding (eps divides by alpha ~ 0.0025)


def test_a_former_checkpoint_that_does_not_fit_its_settings_is_refused():
    model, meta = load_checkpoint(GOLDEN / "legacy-unet-updown")
    state = load_file(str(GOLDEN / "legacy-unet-updown" / "model.safetensors"))
    state["backbone.down.9.0.conv1.weight"] = state["backbone.conv_in.weight"]
    with pytest.raises(KeyError, match="down.9"):
        convert_state(state, meta.model, meta.data)


def test_gradient_checkpointing_keeps_losses_and_gradients():
    """dist.gradient_checkpointing recomputes activations in backward: same loss, same gradients, same dropout."""
    from raypd.config import load_config as load
    from raypd.train.objective import TeacherTraining

    z, logsnr = _inputs(4)
    grads = []
    for on in (False, True):
        cfg = load(None, ["model.dropout=0.3", f"dist.gradient_checkpointing={str(on).lower()}"])
        model = TeacherTraining(cfg).setup(torch.device("cpu")).roles["teacher"].model
        _unzero(model)
        torch.manual_seed(5)
        loss = model(z, logsnr).square().mean()
        loss.backward()
        assert model.backbone.unet.is_gradient_checkpointing == on
        grads.append((loss.item(), [p.grad.clone() for p in model.parameters()]))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-6)
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_attention_runs_through_sdpa_with_contiguous_heads(monkeypatch):
    """q, k, v reach PyTorch's scaled_dot_product_attention as [B, heads, tokens, head_dim] with unit stride in
    head_dim, the layout its fused (flash / memory-efficient) kernels need on GPUs."""
    import torch.nn.functional as F

    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        seen.append((q.shape, q.stride(-1), k.stride(-1), v.stride(-1)))
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    model = _tiny(head_channels=16)
    z, logsnr = _inputs()
    model(z, logsnr)
    assert len(seen) == 4  # at 8 px: one down block, two up blocks; and the middle block
    for shape, *strides in seen:
        assert shape[0] == 2 and shape[-1] == 16 and strides == [1, 1, 1]
