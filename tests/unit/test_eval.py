"""FID/KID through torch-fidelity with both extractors, the reference cache, and the FID plot."""

from pathlib import Path

import numpy as np
import pytest
import torch

from raypd.config import DataConfig
from raypd.data.prepare import training_shards
from raypd.data.shards import ShardLoader
from raypd.eval.classifier import save_classifier, train_classifier
from raypd.eval.setup import read_images
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


def test_points_scored_with_fewer_samples_are_marked_in_the_table_and_drawn_hollow(tmp_path):
    from raypd.eval.report import steps_table

    rows = [{"sampler": s, "steps": n, "fid": f, "kid": 0.01, "rmse_to_full": 0.1, "extractor": "classifier-x",
             "n_samples": 64 if n <= 4 or (s, n) == ("teacher_ddim", 16) else 16}
            for s, pts in (("teacher_ddim", {16: 5.0, 8: 7.0, 4: 20.0}), ("distilled", {8: 6.5, 4: 8.0}))
            for n, f in pts.items()]
    table = "\n".join(steps_table(rows, [{"student_steps": 8}, {"student_steps": 4}], 16))
    assert "| 8 | 6.50 (n=16) | 7.00 (n=16) |" in table and "| 4 | 8.00 | 20.00 |" in table
    assert "| 16 (teacher) | - | 5.00 |" in table
    assert plot_fid_vs_steps(rows, 16, tmp_path / "fid.png").is_file()
    # the claim read off the run: only at equal sample counts, at few steps, with the compute against the teacher's
    from raypd.eval.report import gap_lines

    rounds = [{"student_steps": 8, "compute": 50.0}, {"student_steps": 4, "compute": 100.0}]
    assert gap_lines(rows, rounds, 16, 200.0) == [
        "- 4 steps: the student closes 80.0% in FID of the gap between the teacher's 4-step DDIM and its 16-step "
        "sampler, at 0.50x the teacher's training compute.", ""]


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


def _noisy_model(cfg, scale=0.02):
    from raypd.models import build_denoiser

    torch.manual_seed(0)
    model = build_denoiser(cfg.model, cfg.data).eval()
    for p in model.parameters():  # zero-initialised outputs would make every sample alike
        p.data.add_(scale * torch.randn_like(p))
    return model


def test_the_noise_is_the_same_however_it_is_sliced():
    from raypd.eval.samples import NOISE_BLOCK, fixed_noise, noise_slice

    z, y = fixed_noise(2 * NOISE_BLOCK + 40, 1, 4, seed=3, num_classes=10)
    for start, stop in ((0, 7), (250, 270), (NOISE_BLOCK, 2 * NOISE_BLOCK + 40), (511, 512)):
        zs, ys = noise_slice(start, stop, 1, 4, seed=3, num_classes=10)
        assert torch.equal(zs, z[start:stop]) and torch.equal(ys, y[start:stop])
    # blocks are independent draws, and another seed draws other noise
    assert not torch.allclose(z[:NOISE_BLOCK], z[NOISE_BLOCK:2 * NOISE_BLOCK])
    assert not torch.allclose(fixed_noise(8, 1, 4, seed=4)[0], z[:8])


def test_ray_tasks_give_the_chunks_one_process_would(digits, tmp_path):
    import ray

    from raypd.config import load_config
    from raypd.distributed.evaluate import RayEvaluation
    from raypd.eval.chunks import FullSamples, chunks_of, collect, run_here

    _, extractor, _, _ = digits
    cfg = load_config(None, ["data.resolution=8", "model.attn_resolutions=[4]", "eval.num_samples=600",
                             "eval.chunk_size=256", "eval.grid_size=300"])
    model = _noisy_model(cfg)
    logsnr_fn = cfg.diffusion.logsnr_fn()
    chunks = chunks_of(cfg, "ddim", 2, extractor)
    assert [(c.start, c.stop) for c in chunks] == [(0, 256), (256, 512), (512, 600)]
    full = FullSamples(tmp_path / "full.npy")
    here = collect(run_here(model, chunks, logsnr_fn=logsnr_fn, device=torch.device("cpu")), n=600,
                   shape=(1, 8, 8), grid_size=300, full=full, write_full=True)
    assert full.exists((600, 1, 8, 8)) and here.rmse_to_full == 0.0 and here.grid.shape == (300, 1, 8, 8)
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    try:
        remote = RayEvaluation(cfg, workers=1, use_gpu=False)
        seen = []
        results = ((c, i, f) for c, i, f in remote.run(model, chunks) if not seen.append(c.start))
        there = collect(results, n=600, shape=(1, 8, 8), grid_size=300, full=full)
    finally:
        ray.shutdown()
    assert sorted(seen) == [0, 256, 512]
    assert there.rmse_to_full <= 1 / 127.5  # the same images, up to the uint8 rounding of float sums
    assert (there.grid - here.grid).abs().max().item() <= 1 / 127.5 + 1e-6
    for key, value in here.features.items():
        torch.testing.assert_close(there.features[key], value, rtol=1e-4, atol=1e-4)
    # the uint8 images are those of one pass over the whole noise
    from raypd.eval.fid import to_uint8
    from raypd.eval.samples import fixed_noise, sample_ddim

    z, y = fixed_noise(600, 1, 8, seed=cfg.eval.seed)
    whole = to_uint8(sample_ddim(model, z, y, 2, logsnr_fn=logsnr_fn))
    assert (full.read(0, 600).int() - whole.int()).abs().max().item() <= 1


def _flaky(marker: str, item: int) -> int:
    """A task: item 1's first attempt loses its process, item 3 fails in its own code, item 4 always dies."""
    import os
    from pathlib import Path

    if item == 4 or (item == 1 and not Path(marker).exists()):
        Path(marker).touch()
        os._exit(1)
    if item == 3:
        raise ValueError("item 3 is bad")
    return item * 10


def test_a_task_whose_process_dies_runs_again_and_is_counted_while_its_own_errors_are_not_retried(tmp_path):
    import ray
    from ray.exceptions import RayTaskError, WorkerCrashedError

    from raypd.distributed.evaluate import RETRIES, run_tasks

    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[2])}})
    try:
        task = ray.remote(max_retries=0)(_flaky)
        marker, lost = str(tmp_path / "died-once"), []
        def submit(item):
            return task.remote(marker, item)
        got = dict(run_tasks(submit, [0, 1, 2], in_flight=2, lost=lambda item, err: lost.append((item, type(err)))))
        assert got == {0: 0, 1: 10, 2: 20} and lost == [(1, WorkerCrashedError)]
        lost.clear()
        with pytest.raises(RayTaskError, match="item 3 is bad"):
            list(run_tasks(submit, [3], in_flight=1, lost=lambda item, err: lost.append(item)))
        assert lost == []  # the task's own error is not a loss: it is not run again
        with pytest.raises(WorkerCrashedError):
            list(run_tasks(submit, [4], in_flight=1, lost=lambda item, err: lost.append(item)))
        assert lost == [4] * RETRIES  # then it gives up
    finally:
        ray.shutdown()


def test_bf16_sampling_keeps_the_parameterization_and_the_sampler_in_fp32():
    from raypd.config import load_config
    from raypd.eval.chunks import sampling_dtype
    from raypd.eval.samples import fixed_noise, sample_ddim

    cpu = torch.device("cpu")  # eval.precision: auto is fp32 off GPUs, bf16 is asked for, fp32 is none
    assert [sampling_dtype(p, cpu) for p in ("auto", "bf16", "fp32")] == [None, torch.bfloat16, None]

    for parameterization in ("eps", "v", "both"):
        cfg = load_config(None, ["data.resolution=8", "model.attn_resolutions=[4]",
                                 f"model.parameterization={parameterization}"])
        model = _noisy_model(cfg, 0.005)
        z, _ = fixed_noise(8, 1, 8, seed=1)
        logsnr = torch.full((8,), -18.0)  # alpha = 1.2e-4: eps's division by alpha, where bf16 would lose it
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            x_hat = model(z, logsnr)
            raw = model.backbone(z, logsnr)
        assert raw.dtype == torch.bfloat16 and x_hat.dtype == torch.float32
        from raypd.diffusion import x_from_output

        torch.testing.assert_close(x_hat, x_from_output(raw.float(), z, logsnr, parameterization))
        if parameterization == "eps":
            continue  # a random eps network's samples all clip to +-1 whatever the precision
        logsnr_fn = cfg.diffusion.logsnr_fn()
        fp32 = sample_ddim(model, z, None, 4, logsnr_fn=logsnr_fn)
        bf16 = sample_ddim(model, z, None, 4, logsnr_fn=logsnr_fn, dtype=torch.bfloat16)
        diff = (bf16 - fp32).abs()
        assert bf16.dtype == torch.float32 and 0 < diff.mean().item() < 0.02, (parameterization, diff.mean())


def test_the_chunk_path_follows_eval_precision_and_draws_stochastic_steps_per_noise_block(digits):
    from raypd.config import load_config
    from raypd.eval.chunks import chunks_of, collect, run_here

    _, extractor, _, _ = digits

    def point(sampler, *overrides):
        cfg = load_config(None, ["data.resolution=8", "model.attn_resolutions=[4]", "eval.num_samples=300",
                                 "eval.grid_size=300", *overrides])
        model = _noisy_model(cfg, 0.005)
        return collect(run_here(model, chunks_of(cfg, sampler, 2, extractor), logsnr_fn=cfg.diffusion.logsnr_fn(),
                                device=torch.device("cpu")), n=300, shape=(1, 8, 8), grid_size=300, full=None).grid

    fp32, bf16 = point("ddim", "eval.precision=fp32"), point("ddim", "eval.precision=bf16")
    assert torch.equal(point("ddim"), fp32)  # auto is fp32 off GPUs
    assert 0 < (bf16 - fp32).abs().mean().item() < 0.02
    # the ancestral sampler's step noise comes from (seed, block): the same however the point is chunked
    small, large = point("stochastic", "eval.chunk_size=256"), point("stochastic", "eval.chunk_size=512")
    assert torch.equal(small, large) and (small - fp32).abs().mean().item() > 0.01


def _hwm_mib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/clear_refs"), reason="needs Linux's peak-RSS reset")
def test_the_driver_holds_a_chunk_not_the_sample_set(tmp_path):
    """65,536 samples of 3x32x32 (805 MB as float32, 201 MB as uint8) folded in with a 100 MiB ceiling over what
    the process held before: the driver keeps a chunk of images, the features, the grid and the distance."""
    import gc

    from raypd.eval.chunks import Chunk, FullSamples, collect

    n, size, shape = 65536, 2048, (3, 32, 32)

    def results(offset):
        for start in range(0, n, size):
            chunk = Chunk("ddim", 1, start, start + size, 0, *shape[:2], 0, "fp32", {}, False, False)
            g = torch.Generator().manual_seed(start)
            images = torch.randint(0, 255, (size, *shape), dtype=torch.uint8, generator=g)
            yield chunk, images.add_(offset), {"f": torch.randn(size, 16)}

    full = FullSamples(tmp_path / "full.npy")
    gc.collect()
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak to what the process holds now
    before = _hwm_mib()
    first = collect(results(0), n=n, shape=shape, grid_size=64, full=full, write_full=True)
    other = collect(results(1), n=n, shape=shape, grid_size=64, full=full)
    grown = _hwm_mib() - before
    assert full.exists((n, *shape)) and first.rmse_to_full == 0.0
    assert first.features["f"].shape == (n, 16) and first.grid.shape == (64, *shape)
    assert other.rmse_to_full == pytest.approx(1 / 127.5, rel=1e-9)  # every pixel one level up
    assert grown < 100, f"the driver's peak memory grew by {grown:.0f} MiB"


def test_the_full_samples_round_trip_and_the_record_is_kept_per_set_up(tmp_path):
    from raypd.eval.chunks import FullSamples
    from raypd.eval.record import EvalRecord, fingerprint

    full = FullSamples(tmp_path / "full.npy")
    assert not full.exists((3, 1, 4, 4))
    images = torch.arange(48, dtype=torch.uint8).reshape(3, 1, 4, 4)
    writer = full.writer((3, 1, 4, 4))
    writer.write(2, images[2:])
    writer.write(0, images[:2])
    assert not full.exists((3, 1, 4, 4))  # not there until it is whole
    writer.close()
    assert full.exists((3, 1, 4, 4)) and not full.exists((4, 1, 4, 4))
    assert torch.equal(full.read(1, 3), images[1:3])
    assert np.load(full.path, allow_pickle=False).shape == (3, 1, 4, 4)  # plain NumPy, no pickle

    key = fingerprint(eval={"num_samples": 16}, teacher="abc")
    assert key == fingerprint(teacher="abc", eval={"num_samples": 16}) != fingerprint(eval={"num_samples": 32},
                                                                                       teacher="abc")
    record = EvalRecord(tmp_path, key)
    assert record.get("teacher_ddim-4") is None
    record.put("teacher_ddim-4", {"fid": 12.5})
    assert EvalRecord(tmp_path, key).get("teacher_ddim-4") == {"fid": 12.5}
    other = EvalRecord(tmp_path, fingerprint(eval={"num_samples": 32}, teacher="abc"))
    assert other.get("teacher_ddim-4") is None  # another set-up: set aside
    assert (tmp_path / f"record-{key}.json").is_file()


def test_every_fid_names_its_protocol_and_the_reference_digest_survives_the_cache(digits, tmp_path):
    import hashlib

    from raypd.config import DataConfig
    from raypd.eval.protocol import images_sha256, reference_sidecar
    from raypd.eval.setup import EvalSpec

    root, extractor, images, _ = digits
    urls = training_shards(DataConfig(resolution=8, num_classes=10, loader_workers=0), root)
    spec = EvalSpec(extractor, tuple(urls), 100, 1, 8, str(tmp_path / "cache"), "ref-p", 64, 7,
                    reference_source="digits")
    first = spec.score(images[200:264])
    p = first["protocol"]
    weights = (root / "clf" / "model.safetensors").read_bytes()
    assert p["extractor"]["weights_sha256"] == hashlib.sha256(weights).hexdigest()
    reference = read_images(urls, 100, channels=1, resolution=8)
    assert p["reference"] == {"source": "digits", "split": "train", "count": 100, "sha256": images_sha256(reference),
                              "order": p["reference"]["order"]}
    assert p["samples"] == 64 and p["noise"] == {"seed": 7, "scheme": "blocks-256"}
    assert p["extractor"]["resize"].startswith("none")
    # a cache hit reads no image, and still names the same reference
    def unreadable():
        raise AssertionError("the reference was read again")

    hit = fidelity(images[200:264], ImageSet(100, unreadable, rgb=False), extractor,
                   cache_root=tmp_path / "cache", cache_name="ref-p")
    assert hit["fid"] == pytest.approx(first["fid"], rel=1e-6)
    assert spec.protocol(64) == p
    # statistics cached before their record existed: the images are read once to describe them
    reference_sidecar(spec.cache_root, spec.cache_name).unlink()
    assert spec.protocol(64)["reference"]["sha256"] == p["reference"]["sha256"]
    # another reference set is another digest
    other = EvalSpec(extractor, tuple(urls), 90, 1, 8, str(tmp_path / "cache"), "ref-q", 64, 7,
                     reference_source="digits")
    assert other.score(images[200:264])["protocol"]["reference"]["sha256"] != p["reference"]["sha256"]


def test_the_record_s_set_up_is_the_same_wherever_the_run_lives(digits, tmp_path):
    import dataclasses
    import shutil

    from raypd.config import DataConfig
    from raypd.eval.setup import EvalSpec

    root, extractor, _, _ = digits
    urls = training_shards(DataConfig(resolution=8, num_classes=10, loader_workers=0), root)
    spec = EvalSpec(extractor, tuple(urls), 100, 1, 8, str(tmp_path / "cache"), "ref-p", 64, 7)
    moved_weights = tmp_path / "elsewhere" / "clf"
    shutil.copytree(extractor.weights, moved_weights)
    moved = spec.with_locations(lambda p: str(moved_weights) if p == extractor.weights else f"/moved{p}")
    assert moved.to_dict() != spec.to_dict() and moved.identity() == spec.identity()
    # what changes the scores changes the set-up
    assert dataclasses.replace(spec, num_samples=128).identity() != spec.identity()
    assert dataclasses.replace(spec, seed=8).identity() != spec.identity()
    assert dataclasses.replace(spec, cache_name="ref-q").identity() != spec.identity()
    retrained = tmp_path / "retrained"
    shutil.copytree(extractor.weights, retrained)
    blob = (retrained / "model.safetensors").read_bytes()
    (retrained / "model.safetensors").write_bytes(blob[:-1] + bytes([blob[-1] ^ 1]))
    other = dataclasses.replace(spec, extractor=dataclasses.replace(extractor, weights=str(retrained)))
    assert other.identity() != spec.identity()
