"""FID/KID through torch-fidelity with both extractors, the reference cache, and the FID plot."""

import numpy as np
import pytest
import torch

from raypd.config import DataConfig
from raypd.data.prepare import training_shards
from raypd.data.shards import ShardLoader
from raypd.eval.classifier import save_classifier, train_classifier
from raypd.eval.evaluate import read_images
from raypd.eval.fid import Extractor, ImageSet, fidelity
from raypd.eval.report import plot_fid_vs_steps
from tests.assets import asset


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    cfg = DataConfig(resolution=8, num_classes=10, loader_workers=0)
    urls = training_shards(cfg, root)
    loader = ShardLoader(urls, batch_size=64, channels=1, num_classes=10, resolution=8)
    net, accuracy = train_classifier(iter(loader), channels=1, num_classes=10, resolution=8, updates=150)
    save_classifier(net, root / "clf", {"train_accuracy": accuracy})
    images = read_images(urls, 400, channels=1, resolution=8).float() / 127.5 - 1
    return root, Extractor("classifier", str(root / "clf"), tag="digits"), images, accuracy


def _ref(images):
    from raypd.eval.fid import to_uint8

    return ImageSet(images.shape[0], lambda: to_uint8(images), rgb=False)


def test_classifier_learns_and_fid_separates_same_from_shifted(digits, tmp_path):
    root, extractor, images, accuracy = digits
    assert accuracy > 0.8
    a, b = images[:200], images[200:]
    kw = dict(cache_root=tmp_path, cache_name="ref-b")
    same = fidelity(a, _ref(a), extractor, cache_root=tmp_path, cache_name="ref-a")
    other_half = fidelity(a, _ref(b), extractor, **kw)
    shifted = fidelity((a + 0.8 * torch.randn_like(a)).clamp(-1, 1), _ref(b), extractor, **kw)
    assert same["fid"] < 1e-2
    assert shifted["kid"] > other_half["kid"]
    assert other_half["fid"] < 0.5 * shifted["fid"] and shifted["fid"] > 1.0
    assert shifted["extractor"] == "classifier-digits" and shifted["n_samples"] == 200


def test_reference_statistics_are_cached(digits, tmp_path):
    _, extractor, images, _ = digits
    first = fidelity(images[:100], _ref(images[100:300]), extractor, cache_root=tmp_path, cache_name="ref-x")

    def unreadable():
        raise AssertionError("the reference was read again instead of coming from the cache")

    again = fidelity(images[:100], ImageSet(200, unreadable, rgb=False), extractor, cache_root=tmp_path,
                     cache_name="ref-x")
    assert again["fid"] == pytest.approx(first["fid"], rel=1e-6)
    assert any(tmp_path.rglob("*ref-x*"))


def test_inception_on_a_handful_of_real_images(tmp_path):
    weights = asset("inception-2015-12-05-fid2048-nofc.pth")
    with np.load(asset("cifar10_test_jpeg75.npz")) as data:
        x = torch.from_numpy(data["x"][::500][:20]).permute(0, 3, 1, 2).contiguous()  # 20 images across classes
    images = x.float() / 127.5 - 1
    extractor = Extractor("inception", str(weights))
    ref = ImageSet(20, lambda: x, rgb=True)
    same = fidelity(images, ref, extractor, cache_root=tmp_path, cache_name="ref-c", kid=False)
    noisy = fidelity((images + 0.5 * torch.randn_like(images)).clamp(-1, 1), ref, extractor,
                     cache_root=tmp_path, cache_name="ref-c", kid=False)
    assert same["fid"] < 1.0 and noisy["fid"] > 50 * max(same["fid"], 1.0)
    assert noisy["extractor"] == "inception-v3-compat"


def test_missing_inception_weights_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="eval.inception_weights"):
        Extractor("inception", str(tmp_path / "nope.pth")).fidelity_kwargs()


def test_fid_plot_has_both_curves(tmp_path):
    from PIL import Image

    rows = [{"sampler": s, "steps": n, "fid": f, "extractor": "classifier-x", "n_samples": 64}
            for s, pts in (("teacher_ddim", {8: 5.0, 4: 20.0, 2: 60.0, 1: 200.0}),
                           ("distilled", {4: 6.0, 2: 8.0, 1: 12.0})) for n, f in pts.items()]
    path = plot_fid_vs_steps(rows, 8, tmp_path / "fid.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3).astype(int)

    def count(rgb):
        return int((np.abs(pixels - np.array(rgb)).sum(1) < 30).sum())

    assert count((31, 119, 180)) > 100 and count((255, 127, 14)) > 100  # matplotlib's first two line colours


class Payload:
    """Stands for any object whose unpickling would run code."""


def test_inception_weights_holding_code_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"w": Payload()}, path)
    with pytest.raises(ValueError, match="not a plain state dict of tensors"):
        Extractor("inception", str(path)).fidelity_kwargs()


def test_metrics_from_gathered_features_equal_the_direct_path(digits, tmp_path):
    from raypd.eval.fid import extract_features, fidelity_from_features

    _, extractor, images, _ = digits
    gen = (images[:120] + 0.3 * torch.randn_like(images[:120])).clamp(-1, 1)
    direct = fidelity(gen, _ref(images[200:]), extractor, cache_root=tmp_path, cache_name="ref-d")
    # features from two "workers", gathered in order
    parts = [extract_features(gen[:50], extractor), extract_features(gen[50:], extractor)]
    gathered = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    spread = fidelity_from_features(gathered, _ref(images[200:]), extractor, cache_root=tmp_path, cache_name="ref-d")
    assert spread["fid"] == pytest.approx(direct["fid"], rel=1e-4)
    assert spread["kid"] == pytest.approx(direct["kid"], rel=1e-3, abs=1e-6)
    assert spread["n_samples"] == 120 and spread["extractor"] == direct["extractor"]


def test_ray_tasks_generate_and_extract_what_one_process_would(digits, tmp_path):
    import ray

    from raypd.config import load_config
    from raypd.diffusion import logsnr_schedule
    from raypd.distributed.evaluate import RayEvaluation
    from raypd.eval.fid import extract_features
    from raypd.eval.samples import fixed_noise, sample_ddim
    from raypd.models import build_denoiser

    _, extractor, _, _ = digits
    cfg = load_config(None, ["data.resolution=8", "model.attn_resolutions=[4]"])
    torch.manual_seed(0)
    model = build_denoiser(cfg.model, cfg.data).eval()
    for p in model.parameters():  # zero-initialised outputs would make every sample alike
        p.data.add_(0.02 * torch.randn_like(p))
    z, y = fixed_noise(40, 1, 8, seed=5)
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    try:
        samples, features = RayEvaluation(cfg, workers=2, use_gpu=False).run(model, z, y, 2, extractor, kid=True,
                                                                              prc=False)
    finally:
        ray.shutdown()
    local = sample_ddim(model, z, y, 2, logsnr_fn=logsnr_schedule)
    assert (samples - local).abs().max().item() <= 1 / 127.5 + 1e-6  # uint8 round trip
    mine = extract_features(local, extractor)
    for key, value in mine.items():
        torch.testing.assert_close(features[key], value, rtol=1e-4, atol=1e-4)


def test_the_evaluation_record_is_kept_per_set_up_and_its_full_samples_round_trip(tmp_path):
    import torch

    from raypd.eval.record import EvalRecord, fingerprint

    key = fingerprint(eval={"num_samples": 16}, teacher="abc")
    assert key == fingerprint(teacher="abc", eval={"num_samples": 16}) != fingerprint(eval={"num_samples": 32},
                                                                                       teacher="abc")
    record = EvalRecord(tmp_path, key)
    assert record.get("teacher_ddim-4") is None and record.full_samples() is None
    full = record.keep_full(torch.linspace(-1, 1, 48).reshape(3, 1, 4, 4) / 3)
    record.put("teacher_ddim-4", {"fid": 12.5})
    again = EvalRecord(tmp_path, key)
    assert again.get("teacher_ddim-4") == {"fid": 12.5}
    assert torch.equal(again.full_samples(), full) and full.dtype == torch.float32
    other = EvalRecord(tmp_path, fingerprint(eval={"num_samples": 32}, teacher="abc"))
    assert other.get("teacher_ddim-4") is None and other.full_samples() is None  # another set-up: set aside
    assert (tmp_path / f"record-{key}.json").is_file()
