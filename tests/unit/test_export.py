"""Every raypd student exports as a diffusers pipeline that samples exactly as raypd's sampler does.

Students here are raypd's own network (a UNet2DModel conditioned on continuous logsnr) with random
weights, so every layer matters; each case is loaded back with diffusers, offline, and sampled from
the same noise as raypd's DDIM sampler. The bar: max |diff| <= 1e-4 + 1e-6 max |x|.
"""

from __future__ import annotations

import json

import pytest
import torch

from raypd.checkpoint import load_checkpoint, meta_for, save_checkpoint
from raypd.config import load_config
from raypd.diffusion import ddim_sample
from raypd.hf.export import ExportError, export_student, load_pipeline, pipeline_noise, plan_export
from raypd.models import build_denoiser

N = 3  # samples per comparison


def _student(tmp_path, parameterization: str, steps: int, classes: int = 0, **extra):
    cfg = load_config(None, ["data.resolution=8", f"data.num_classes={classes}", "model.ch_mult=[1,2]",
                             "model.attn_resolutions=[4]", f"model.parameterization={parameterization}",
                             *[f"{k}={v}" for k, v in extra.items()]])
    torch.manual_seed(0)
    model = build_denoiser(cfg.model, cfg.data)
    with torch.no_grad():  # random weights everywhere, the zero-initialised output layers included
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path / f"student-{parameterization}-{steps}-{classes}"
    return save_checkpoint(path, model, meta_for(cfg, kind="student", sampling_steps=steps, round=0,
                                                 metrics={"fid": 7.25}))


def _raypd(path, clip: bool, seed: int = 11):
    model, meta = load_checkpoint(path)
    z, y = pipeline_noise(N, meta.data.channels, meta.data.resolution, seed=seed, num_classes=meta.data.num_classes)
    with torch.no_grad():
        x = ddim_sample(model.eval().bind(y), z, meta.sampling_steps, clip=clip, logsnr_fn=meta.logsnr_fn())
    return z, y, x, meta.sampling_steps


def _unclamped(pipe, z, steps: int, clip: bool):
    """DDIMPipeline's own loop (unet, then scheduler.step) without its final clamp to [0, 1]."""
    pipe.scheduler.set_timesteps(steps)
    with torch.no_grad():
        for t in pipe.scheduler.timesteps:
            z = pipe.scheduler.step(pipe.unet(z, t).sample, t, z, eta=0.0, use_clipped_model_output=clip).prev_sample
    return z


def _within(diff: float, x, parameterization: str = "x", clip: bool = True) -> bool:
    """1e-4 + 1e-6 max|x|; 1e-4 + 1e-4 max|x| for unclipped eps students (float32 betas, see EPS_UNCLIPPED_RELATIVE)."""
    relative = 1e-4 if parameterization == "eps" and not clip else 1e-6
    return diff <= 1e-4 + relative * x.abs().max().item()


# (parameterization, steps, classes, clip) -> which pipeline diffusers must load
CASES = [
    ("x", 4, 0, True, "DDIMPipeline", "sample"),
    ("v", 2, 0, True, "DDIMPipeline", "v_prediction"),
    ("eps", 4, 0, True, "DDIMPipeline", "epsilon"),
    ("both", 1, 0, True, "DDIMPipeline", "v_prediction"),  # the two heads folded at t = 1
    ("x", 2, 0, False, "DDIMPipeline", "sample"),
    ("v", 4, 0, False, "DDIMPipeline", "v_prediction"),
    ("eps", 2, 0, False, "DDIMPipeline", "epsilon"),
    ("both", 1, 0, False, "DDIMPipeline", "v_prediction"),
    ("both", 4, 0, True, "RaypdDDIMPipeline", "sample"),
    ("both", 2, 0, False, "RaypdDDIMPipeline", "sample"),
    ("v", 2, 3, True, "RaypdDDIMPipeline", "sample"),
    ("both", 1, 3, True, "RaypdDDIMPipeline", "sample"),
    ("eps", 4, 3, False, "RaypdDDIMPipeline", "sample"),
]


@pytest.mark.parametrize("parameterization, steps, classes, clip, pipeline, prediction", CASES)
def test_every_student_samples_in_diffusers_as_in_raypd(tmp_path, parameterization, steps, classes, clip, pipeline,
                                                          prediction):
    path = _student(tmp_path, parameterization, steps, classes)
    out, checked = export_student(path, tmp_path / "pipe", clip=clip)
    z, y, ours, n = _raypd(path, clip)
    pipe = load_pipeline(out)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe).__name__ == pipeline
    scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "DDIMScheduler" and scheduler["prediction_type"] == prediction
    assert scheduler["clip_sample"] == clip and scheduler["timestep_spacing"] == "trailing"
    assert scheduler["set_alpha_to_one"] and scheduler["steps_offset"] == 0
    assert scheduler["num_train_timesteps"] % n == 0
    unet = json.loads((out / "unet" / "config.json").read_text())
    assert unet["_class_name"] == "UNet2DModel" and unet["time_embedding_type"] == "learned"
    gen = torch.Generator().manual_seed(11)
    if pipeline == "DDIMPipeline":
        images = pipe(batch_size=N, generator=gen, num_inference_steps=n, eta=0.0,
                      use_clipped_model_output=clip, output_type="np").images
        images = torch.from_numpy(images).permute(0, 3, 1, 2)
        assert (images - (ours / 2 + 0.5).clamp(0, 1)).abs().max() <= 1e-4
        diff = (_unclamped(pipe, z.clone(), n, clip) - ours).abs().max().item()
    else:
        labels = {} if y is None else {"class_labels": y}
        got = pipe(batch_size=N, generator=gen, num_inference_steps=n, output_type="pt", **labels).images
        diff = (got - ours).abs().max().item()
    assert _within(diff, ours, parameterization, clip), diff
    assert _within(checked, ours, parameterization, clip)  # the export's own check agrees


def test_the_export_directory_and_its_model_card(tmp_path):
    path = _student(tmp_path, "both", 1)
    out, checked = export_student(path, tmp_path / "pipe")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "model_index.json", "scheduler", "unet"]
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    card = (out / "README.md").read_text()
    for text in ("1 DDIM step**", "7.250", "DDIMPipeline.from_pretrained", "num_inference_steps=1",
                 "trained by raypd", "digits", "folded into v_prediction", "max abs difference"):
        assert text in card, text
    custom, _ = export_student(_student(tmp_path, "v", 2, classes=3), tmp_path / "labels")
    assert sorted(p.name for p in custom.iterdir()) == ["README.md", "model_index.json", "raypd_pipeline.py",
                                                        "scheduler", "unet"]
    assert json.loads((custom / "model_index.json").read_text())["_class_name"] == ["raypd_pipeline",
                                                                                   "RaypdDDIMPipeline"]
    card = (custom / "README.md").read_text()
    assert "trust_remote_code=True" in card and "class_labels=" in card and "3 classes" in card


def test_the_grid_is_raypds_at_any_step_count_dividing_the_chain(tmp_path):
    meta = load_checkpoint(_student(tmp_path, "x", 16))[1]
    plan = plan_export(meta, 16)
    assert plan.total == 1008 and plan.total % 16 == 0  # N * ceil(1000 / N)
    assert plan_export(meta, 4).total == 1000
    alphas = torch.sigmoid(plan.logsnr.double())
    betas = torch.tensor(plan.betas, dtype=torch.float64)
    torch.testing.assert_close(torch.cumprod(1 - betas, 0), alphas, rtol=1e-12, atol=0)


def test_labels_and_conditioning_are_checked_by_the_pipeline(tmp_path):
    out, _ = export_student(_student(tmp_path, "x", 1, classes=3), tmp_path / "pipe")
    pipe = load_pipeline(out)
    pipe.set_progress_bar_config(disable=True)
    with pytest.raises(ValueError, match="pass class_labels"):
        pipe(batch_size=2)
    with pytest.raises(ValueError, match=r"class_labels must lie in \[0, 3\)"):
        pipe(class_labels=[0, 3])
    assert pipe(class_labels=[0, 2, 1], output_type="np").images.shape == (3, 8, 8, 1)


def test_the_cli_exports_and_refuses_what_it_cannot(tmp_path, capsys):
    from raypd.cli import main as cli

    path = _student(tmp_path, "v", 2)
    assert cli(["export", "--checkpoint", str(path), "--out", str(tmp_path / "cli")]) == 0
    assert "checked: the pipeline's samples are within" in capsys.readouterr().err
    assert cli(["export", "--checkpoint", str(path), "--out", str(tmp_path / "cli")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert cli(["export", "--checkpoint", str(path), "--out", str(tmp_path / "cli"), "--overwrite", "--no-clip",
                "--no-check"]) == 0
    assert not json.loads((tmp_path / "cli" / "scheduler" / "scheduler_config.json").read_text())["clip_sample"]
    with pytest.raises(ExportError, match="steps must be positive"):
        export_student(path, tmp_path / "zero", steps=0)
    assert not (tmp_path / "zero").exists()
