"""The Denoising Student as a stage: its settings, its pairs (sampled once, written as shards, read back by the
training loader with their noise, reused), its regression at t = 1, and a stage on pairs resumed bit for bit."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import raypd.pairs
from raypd.checkpoint import meta_for, save_checkpoint, weights_digest
from raypd.config import ConfigError, DistillConfig, load_config
from raypd.data import Batch
from raypd.data.shards import training_loader
from raypd.diffusion import logsnr_schedule, weighted_mse
from raypd.eval.samples import pair_noise, sample_pairs
from raypd.pairs import ensure_pairs
from raypd.methods import method_for, objective_for
from raypd.methods.denoising_student import PairRegression
from raypd.methods.regression import regression_loss
from raypd.train.runner import InProcessRunner
from raypd.train.stage import Stage
from tests.plans import method_of
from tests.teachers import perturbed_denoiser
from tests.unit.test_stage_loop import interrupted_at

TINY = ["data.resolution=8", "model.attn_resolutions=[4]", "model.ch=32", "model.ch_mult=[1,2]",
        "distill.batch_size=8", "data.loader_workers=0", "run.device=cpu", "dist.checkpoint_every=4",
        "distill.method=denoising_student", "distill.start_steps=4", "distill.denoising_student.pairs=40",
        "data.num_classes=10"]


def test_denoising_student_settings_are_checked_up_front():
    method = method_of(DistillConfig(method="denoising_student", start_steps=16, updates_per_round=100,
                                     late_rounds_factor=2.0, options={"denoising_student": {"pairs": 1000}}))
    assert [(r.teacher_steps, r.student_steps, r.updates) for r in method.plan()] == [(16, 1, 200)]
    assert method.upfront().pairs == 1000
    assert method.upfront_forwards() == 16_000 and method.forwards_per_example() == 3
    plain = method_of(DistillConfig())
    assert plain.upfront() is None and plain.upfront_forwards() == 0 and plain.forwards_per_example() == 5
    for overrides, message in [
        (["distill.method=denoising_student", "distill.end_steps=2"], "distill.end_steps: the Denoising Student"),
        (["distill.method=denoising_student", "distill.denoising_student.pairs=8"],
         r"distill.denoising_student.pairs: must be at least distill.batch_size \(16\)"),
        (["distill.method=denoising_student", "distill.denoising_student.phases=[1]"],
         "distill.denoising_student.phases: unknown key"),
    ]:
        with pytest.raises(ConfigError, match=message):
            method_for(load_config(None, overrides))
    with pytest.raises(ConfigError, match="distill.pairs: this setting moved to distill.denoising_student.pairs"):
        load_config(None, ["distill.pairs=64"])


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    cfg = load_config(None, TINY)
    path = tmp_path_factory.mktemp("ds") / "teacher"
    save_checkpoint(path, perturbed_denoiser(cfg), meta_for(cfg, kind="teacher", sampling_steps=4, round=None))
    return cfg, path


def test_pairs_are_the_teachers_ddim_samples_of_their_noise_and_are_made_once(teacher_dir, tmp_path, monkeypatch):
    cfg, path = teacher_dir
    teacher = perturbed_denoiser(cfg).eval()
    urls = ensure_pairs(cfg, tmp_path, teacher, weights_digest(path), count=40, device=torch.device("cpu"))
    manifest = json.loads((tmp_path / "pairs" / next((tmp_path / "pairs").iterdir()).name / "manifest.json")
                          .read_text())
    assert manifest["pairs"] and manifest["splits"]["train"]["count"] == 40 and len(urls) == 8
    z_all, y_all = pair_noise(cfg, 0, 40)
    x_all = sample_pairs(teacher, cfg, 0, 40, torch.device("cpu")).float() / 127.5 - 1
    # the pair noise is its own stream: not the evaluation noise of the same seed
    assert not torch.equal(z_all[:4], pair_noise(load_config(None, TINY + ["run.seed=1"]), 0, 4)[0])

    loader = training_loader(urls, cfg.data, batch_size=8, seed=0, stream=1, pairs=True)
    batch = next(iter(loader))
    assert batch.z is not None and batch.z.shape == batch.x.shape and batch.y is not None
    for x, y, z in zip(batch.x, batch.y, batch.z):
        (i,) = [i for i in range(40) if torch.equal(z_all[i], z)]
        assert torch.equal(x, x_all[i]) and int(y) == int(y_all[i])

    # a second call (a resumed or rerun run) samples nothing: it finds the shards
    monkeypatch.setattr(raypd.pairs, "sample_pairs", lambda *a, **k: pytest.fail("sampled the pairs again"))
    assert ensure_pairs(cfg, tmp_path, teacher, weights_digest(path), count=40, device=torch.device("cpu")) == urls


def test_the_pair_loss_is_a_regression_from_the_noise_at_t_1_without_the_teacher():
    cfg = load_config(None, TINY)
    student = perturbed_denoiser(cfg).eval()  # no dropout: the two forwards must match
    x, z = torch.rand(4, 1, 8, 8) * 2 - 1, torch.randn(4, 1, 8, 8)
    y = torch.tensor([0, 1, 2, 3])
    loss = regression_loss(PairRegression, {"student": student}, Batch(x, y, z), student_steps=1,
                           weighting="snr_trunc", logsnr_fn=logsnr_schedule)
    logsnr_1 = logsnr_schedule(torch.ones(4))
    expected = weighted_mse(student(z, logsnr_1, y).float(), x, logsnr_1, "snr_trunc").mean()
    torch.testing.assert_close(loss, expected)


def test_a_stage_on_pairs_resumes_bit_for_bit(teacher_dir, tmp_path, monkeypatch, capsys):
    cfg, path = teacher_dir
    urls = ensure_pairs(cfg, tmp_path, perturbed_denoiser(cfg).eval(), weights_digest(path), count=40,
                        device=torch.device("cpu"))
    stage = Stage("round", "round-00", updates=8, stream=1, sampling_steps=1, shards=urls, round=0,
                  teacher=str(path), student_steps=1, teacher_steps=4)

    def run(root):
        InProcessRunner(cfg, root / "local", torch.device("cpu"),
                        objectives=lambda stage: objective_for(cfg, stage)).run(stage, root / "out")
        return load_file(str(root / "out" / "model.safetensors"))

    through = run(tmp_path / "through")
    interrupted_at(monkeypatch, 6, lambda: run(tmp_path / "again"))
    resumed = run(tmp_path / "again")
    assert "resumed from the checkpoint at update 4 of 8" in capsys.readouterr().err
    assert all(torch.equal(resumed[k], through[k]) for k in through)
    start = load_file(str(path / "model.safetensors"))
    assert any(not torch.equal(through[k], start[k]) for k in start)  # it trained
