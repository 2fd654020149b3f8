"""diffusers in and out: a tiny UNet2DModel imported as a teacher, distilled, exported, and sampled by diffusers.

Everything is built offline from configs (no hub access): a 16x16 one-channel UNet2DModel with a
DDPM linear-beta scheduler (T = 1000), saved as a DDPMPipeline directory.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from raypd.checkpoint import CheckpointError, load_checkpoint, meta_for, read_meta, save_checkpoint
from raypd.config import ConfigError, load_config
from raypd.diffusion import ddim_sample, logsnr_schedule, make_logsnr_fn
from raypd.diffusion.discrete import DiscreteLogsnr, discrete_logsnr_table, timestep_from_logsnr
from raypd.models import Denoiser, build_denoiser
from raypd.train import freeze, make_student

T = 1000
UNET = dict(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            norm_num_groups=8, attention_head_dim=8)
TINY_RUN = ["data.resolution=16", "teacher.sampling_steps=4", "distill.start_steps=4", "run.device=cpu"]


def _ddpm_betas() -> tuple[float, ...]:
    return tuple(torch.linspace(1e-4, 0.02, T, dtype=torch.float32).tolist())


def _save_pipeline(path, prediction_type="epsilon", **scheduler):
    import diffusers

    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(**UNET)
    sched = diffusers.DDPMScheduler(num_train_timesteps=T, beta_schedule="linear", prediction_type=prediction_type,
                                    **scheduler)
    diffusers.DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def ddpm_dir(tmp_path_factory):
    return _save_pipeline(tmp_path_factory.mktemp("hf") / "ddpm")


def _cfg(path, *extra):
    return load_config(None, TINY_RUN + ["teacher.source=diffusers", f"teacher.diffusers_path={path}",
                                         "teacher.diffusers_local_only=true", *extra])


def _imported(ddpm_dir, tmp_path, *extra):
    from raypd.hf.teacher import import_teacher, run_config

    cfg = _cfg(ddpm_dir, *extra)
    path = import_teacher(cfg, tmp_path / "teacher")
    teacher, meta = load_checkpoint(path)
    return freeze(teacher), meta, run_config(cfg, meta, path)


def _logsnr_fn(cfg):
    d = cfg.diffusion
    return make_logsnr_fn(d.schedule, logsnr_min=d.logsnr_min, logsnr_max=d.logsnr_max, betas=d.discrete_betas)


# ---- the discrete schedule and the logsnr <-> timestep map --------------------------------------------


def test_discrete_schedule_maps_t_to_the_trained_levels_and_back():
    betas = _ddpm_betas()
    fn = DiscreteLogsnr(betas, logsnr_max=20.0)
    table = discrete_logsnr_table(betas)
    ac = torch.cumprod(1 - torch.tensor(betas), 0).double()
    assert torch.allclose(table, torch.log(ac / (1 - ac)), rtol=1e-12)
    k = torch.arange(T, dtype=torch.float64)
    assert torch.equal(fn((k + 1) / T), table)  # t = (k + 1) / T lands on timestep k exactly
    # float32 logsnr (what the samplers carry) snaps back onto the integer timesteps
    assert torch.equal(timestep_from_logsnr(fn(((k + 1) / T).float()), table), k)
    # in between, linear in k, and the inverse undoes it
    frac = torch.linspace(0, T - 1, 3001, dtype=torch.float64)
    frac = frac[(frac - frac.round()).abs() > 2e-3]
    back = timestep_from_logsnr(fn((frac + 1) / T), table)
    assert (back - frac).abs().max() < 1e-6
    # outside the table: clamped to the end timesteps; below t = 1/T rising to logsnr_max at t = 0
    assert timestep_from_logsnr(torch.tensor([50.0, -50.0]), table).tolist() == [0.0, T - 1.0]
    assert fn(torch.tensor([0.0], dtype=torch.float64)).item() == 20.0
    t = torch.linspace(0, 1, 5001, dtype=torch.float64)
    assert (fn(t).diff() < 0).all()
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]"):
        fn(torch.tensor([1.5]))


def test_make_logsnr_fn_is_the_one_factory():
    t = torch.rand(7)
    assert torch.equal(make_logsnr_fn("cosine", logsnr_min=-10.0, logsnr_max=8.0)(t),
                       logsnr_schedule(t, logsnr_min=-10.0, logsnr_max=8.0))
    assert isinstance(make_logsnr_fn("discrete", betas=_ddpm_betas()), DiscreteLogsnr)
    with pytest.raises(ValueError, match="needs the betas"):
        make_logsnr_fn("discrete")
    with pytest.raises(ValueError, match="unknown noise schedule 'sigmoid'"):
        make_logsnr_fn("sigmoid")  # type: ignore[arg-type]


def test_config_keys_for_diffusers_are_checked():
    with pytest.raises(ConfigError, match="teacher.diffusers_path: must name the diffusers model"):
        load_config(None, ["teacher.source=diffusers"])
    with pytest.raises(ConfigError, match="teacher.checkpoint: must be empty when source is 'diffusers'"):
        load_config(None, ["teacher.source=diffusers", "teacher.diffusers_path=x", "teacher.checkpoint=y"])
    with pytest.raises(ConfigError, match="diffusion.discrete_betas: must list"):
        load_config(None, ["diffusion.schedule=discrete"])
    with pytest.raises(ConfigError, match="diffusion.discrete_betas: only the 'discrete' schedule"):
        load_config(None, ["diffusion.discrete_betas=[0.1, 0.2]"])
    with pytest.raises(ConfigError, match="model.diffusers_unet: must hold"):
        load_config(None, ["model.backbone=diffusers"])


def test_student_may_re_read_the_teachers_output():
    teacher = build_denoiser(load_config(None, ["model.parameterization=eps"]).model,
                             load_config(None).data)
    student = make_student(freeze(teacher), "v")
    assert student.parameterization == "v" and teacher.parameterization == "eps"
    assert make_student(teacher).parameterization == "eps"
    with pytest.raises(ValueError, match="'both' has twice the output channels"):
        make_student(teacher, "both")


# ---- import -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_imported_teacher_matches_the_diffusers_model_and_scheduler(ddpm_dir, tmp_path, prediction_type):
    import diffusers

    source = tmp_path / "src"
    shutil.copytree(ddpm_dir, source)
    sched_cfg = source / "scheduler" / "scheduler_config.json"
    sched_cfg.write_text(json.dumps({**json.loads(sched_cfg.read_text()), "prediction_type": prediction_type}))
    teacher, meta, run_cfg = _imported(source, tmp_path)
    assert teacher.parameterization == {"epsilon": "eps", "v_prediction": "v", "sample": "x"}[prediction_type]
    assert run_cfg.model.parameterization == "v" and run_cfg.diffusion.schedule == "discrete"

    unet = diffusers.UNet2DModel.from_pretrained(str(source), subfolder="unet")
    scheduler = diffusers.DDPMScheduler.from_pretrained(str(source), subfolder="scheduler", clip_sample=False)
    fn = _logsnr_fn(run_cfg)
    z = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for k in (0, 1, 250, 777, T - 1):
            ours = teacher(z, fn(torch.full((3,), (k + 1) / T)))
            theirs = scheduler.step(unet(z, k).sample, k, z).pred_original_sample
            assert (ours - theirs).abs().max() <= 1e-6 * (1 + theirs.abs().max()), k


def test_imported_checkpoint_records_the_network_and_stands_alone(ddpm_dir, tmp_path):
    source = tmp_path / "src"
    shutil.copytree(ddpm_dir, source)
    teacher, meta, _ = _imported(source, tmp_path)
    raw = json.loads((tmp_path / "teacher" / "meta.json").read_text())
    assert raw["model"]["backbone"] == "diffusers" and raw["model"]["diffusers_unet"]["block_out_channels"] == [16, 32]
    assert raw["schedule"]["kind"] == "discrete" and raw["schedule"]["discrete_betas"] == list(_ddpm_betas())
    assert raw["parameterization"] == "eps"
    shutil.rmtree(source)  # students and `raypd sample` need the checkpoint only
    again, meta2 = load_checkpoint(tmp_path / "teacher")
    z, logsnr = torch.randn(2, 1, 16, 16), torch.tensor([3.0, -4.0])
    with torch.no_grad():
        assert torch.equal(freeze(again)(z, logsnr), teacher(z, logsnr))
    assert meta2.discrete_betas == _ddpm_betas()


def _write_json(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("case, message", [
    ("vae", "latent diffusion pipeline"),
    ("latent_channels", "latent diffusion model"),
    ("conditional_unet", "UNet2DConditionModel"),
    ("prediction_type", "unknown prediction_type 'x0'"),
    ("beta_schedule", "unknown beta_schedule 'exotic'"),
    ("class_embed", "class_embed_type 'identity'"),
    ("learned_variance", "outputs 2 channels for 1 input channels"),
    ("no_scheduler", "no scheduler config"),
    ("zero_snr", "zero terminal SNR"),
])
def test_models_raypd_cannot_drive_are_refused_by_name(ddpm_dir, tmp_path, case, message):
    from raypd.hf.teacher import import_teacher

    src = tmp_path / "src"
    shutil.copytree(ddpm_dir, src)
    index, unet, sched = src / "model_index.json", src / "unet" / "config.json", src / "scheduler" / "scheduler_config.json"
    patch = lambda p, **kw: _write_json(p, {**json.loads(p.read_text()), **kw})  # noqa: E731
    if case == "vae":
        patch(index, vae=["diffusers", "AutoencoderKL"])
    elif case == "latent_channels":
        patch(unet, in_channels=4, out_channels=4)
    elif case == "conditional_unet":
        patch(index, unet=["diffusers", "UNet2DConditionModel"])
    elif case == "prediction_type":
        patch(sched, prediction_type="x0")
    elif case == "beta_schedule":
        patch(sched, beta_schedule="exotic")
    elif case == "class_embed":
        patch(unet, class_embed_type="identity")
    elif case == "learned_variance":
        patch(unet, out_channels=2)
    elif case == "no_scheduler":
        shutil.rmtree(src / "scheduler")
    elif case == "zero_snr":
        patch(sched, rescale_betas_zero_snr=True)
    with pytest.raises(CheckpointError, match=message):
        import_teacher(_cfg(src), tmp_path / "teacher")
    assert not (tmp_path / "teacher").exists()


def test_missing_directory_and_data_mismatch_are_refused(ddpm_dir, tmp_path):
    from raypd.hf.teacher import import_teacher

    with pytest.raises(CheckpointError, match="is not a directory"):
        import_teacher(_cfg(tmp_path / "nowhere"), tmp_path / "teacher")
    with pytest.raises(CheckpointError, match="sample_size is 16, but data.resolution is 32"):
        import_teacher(_cfg(ddpm_dir, "data.resolution=32"), tmp_path / "teacher")


# ---- distil, export, sample with diffusers --------------------------------------------------------


def _distil(teacher, run_cfg, out_dir, rounds=((2, 3), (1, 3))):
    """Tiny halving rounds with the shared train_step: [(student steps, updates)] -> checkpoint paths."""
    from raypd.data import Batch
    from raypd.methods.progressive import HalvingRound
    from raypd.methods.regression import regression_loss
    from raypd.train import build_plain_engine, linear_decay, train_step

    fn, gen = _logsnr_fn(run_cfg), torch.Generator().manual_seed(0)
    x = torch.rand(8, 1, 16, 16, generator=gen) * 2 - 1
    paths = []
    for index, (steps, updates) in enumerate(rounds):
        student = make_student(teacher, run_cfg.model.parameterization)
        engine = build_plain_engine(student, lr=1e-4, betas=(0.9, 0.999), grad_clip=1.0, schedule=linear_decay(updates))
        for _ in range(updates):
            train_step(engine, regression_loss(HalvingRound, {"student": engine.model, "teacher": teacher}, Batch(x),
                                               student_steps=steps, weighting="snr_trunc", logsnr_fn=fn, generator=gen))
        teacher = freeze(student)
        path = out_dir / f"round-{index:02d}-{steps}steps"
        save_checkpoint(path, teacher, meta_for(run_cfg, kind="student", sampling_steps=steps, round=index,
                                                metrics={"fid": 12.5 + index}))
        paths.append(path)
    return paths


def _assert_diffusers_samples_match(path, out, *, clip: bool = False) -> float:
    """Export, reload offline, sample N steps from the same noise as raypd; returns the max abs difference."""
    import diffusers

    from raypd.hf.export import export_student

    export_student(path, out, clip=clip)
    pipe = diffusers.DDIMPipeline.from_pretrained(str(out), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    student, meta = load_checkpoint(path)
    n = meta.sampling_steps
    z_1 = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(7))  # what the pipeline draws
    with torch.no_grad():
        logsnr_fn = make_logsnr_fn(meta.schedule, logsnr_min=meta.logsnr_min, logsnr_max=meta.logsnr_max,
                                   betas=meta.discrete_betas)
        ours = ddim_sample(student.eval().bind(None), z_1, n, clip=clip, logsnr_fn=logsnr_fn)
        images = pipe(batch_size=4, generator=torch.Generator().manual_seed(7), num_inference_steps=n, eta=0.0,
                      use_clipped_model_output=True if clip else None, output_type="np").images
        images = torch.from_numpy(images).permute(0, 3, 1, 2)
        # the same loop without the pipeline's final (x / 2 + 0.5).clamp(0, 1), to compare unclamped values
        z = z_1.clone()
        pipe.scheduler.set_timesteps(n)
        for t in pipe.scheduler.timesteps:
            z = pipe.scheduler.step(pipe.unet(z, t).sample, t, z, use_clipped_model_output=clip).prev_sample
    # float32 rounding only: measured <= 2e-6 for x and v students. An eps student divides by alpha
    # (0.0064 at t = 1, 0.08 at t = 3/4), so its unclipped x_hat reaches |x| ~ 500 untrained, where one
    # ulp of alpha moves it by ~1e-4 (1e-7 relative), and later steps amplify rounding up to ~2e-5
    assert torch.allclose(images, (ours / 2 + 0.5).clamp(0, 1), rtol=0, atol=1e-4)
    diff = (z - ours).abs().max().item()
    assert diff < 1e-4 + 1e-6 * ours.abs().max().item(), diff
    return diff


def test_distilled_student_exports_and_diffusers_samples_as_raypd_does(ddpm_dir, tmp_path, capsys):
    teacher, _, run_cfg = _imported(ddpm_dir, tmp_path)
    two, one = _distil(teacher, run_cfg, tmp_path)
    assert read_meta(one).model.parameterization == "v"
    for path in (two, one):
        _assert_diffusers_samples_match(path, tmp_path / f"export-{path.name}")
    _assert_diffusers_samples_match(two, tmp_path / "export-clipped", clip=True)

    out = tmp_path / f"export-{two.name}"
    config = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert config["_class_name"] == "DDIMScheduler" and config["timestep_spacing"] == "trailing"
    assert config["prediction_type"] == "v_prediction" and config["set_alpha_to_one"] and not config["clip_sample"]
    assert json.loads((tmp_path / "export-clipped" / "scheduler" / "scheduler_config.json").read_text())["clip_sample"]
    assert config["trained_betas"] == list(_ddpm_betas()) and config["steps_offset"] == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "model_index.json", "scheduler", "unet"]
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    card = (out / "README.md").read_text()
    assert "2 DDIM steps" in card and "num_inference_steps=2" in card and "12.500" in card and str(ddpm_dir) in card

    from raypd.cli import main as cli

    assert cli(["export", "--checkpoint", str(one), "--out", str(tmp_path / "cli")]) == 0
    assert json.loads((tmp_path / "cli" / "model_index.json").read_text())["_class_name"] == "DDIMPipeline"
    assert cli(["export", "--checkpoint", str(one), "--out", str(tmp_path / "cli")]) == 2
    assert "already exists" in capsys.readouterr().err


def test_off_grid_exports_of_an_imported_network_are_refused(ddpm_dir, tmp_path):
    from raypd.hf.export import ExportError, export_student

    teacher, meta, run_cfg = _imported(ddpm_dir, tmp_path)
    student = save_checkpoint(tmp_path / "s", Denoiser(teacher.backbone, "v"),
                              meta_for(run_cfg, kind="student", sampling_steps=16, round=0))
    with pytest.raises(ExportError, match="16 steps do not divide the 1000 training timesteps"):
        export_student(student, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---- the whole pipeline with teacher.source: diffusers ---------------------------------------------


def test_pipeline_imports_a_diffusers_teacher_and_distils_it(ddpm_dir, tmp_path, capsys):
    from raypd.distill import main

    args = TINY_RUN + ["teacher.source=diffusers", f"teacher.diffusers_path={ddpm_dir}",
                       "teacher.diffusers_local_only=true", "distill.updates_per_round=2", "eval.num_samples=8",
                       "eval.grid_size=8", "eval.reference_samples=32", "eval.classifier_updates=5",
                       f"run.storage_path={tmp_path}", "run.name=hf"]
    assert main(["--dry-run", *args]) == 0  # the plan sizes the diffusers UNet, trains no teacher
    plan = capsys.readouterr().out
    assert "ok       teacher: diffusers UNet2DModel" in plan and "eps output" in plan
    assert "teacher " not in plan.split("stage")[1].split("round 0")[0]
    assert main(args) == 0
    run = tmp_path / "hf"
    assert "[teacher] importing the diffusers model" in capsys.readouterr().err
    teacher = read_meta(run / "teacher")
    assert teacher.model.backbone == "diffusers" and teacher.model.parameterization == "eps"
    final = read_meta(run / "round-01-1steps")
    assert final.model.parameterization == "v" and final.schedule == "discrete"
    assert final.discrete_betas == teacher.discrete_betas
    summary = json.loads((run / "summary.json").read_text())
    assert [(r["sampler"], r["steps"]) for r in summary["eval"]][-2:] == [("distilled", 2), ("distilled", 1)]
    from raypd.cli import main as cli

    assert cli(["sample", "--checkpoint", str(run / "round-01-1steps"), "--n", "4", "--out", str(tmp_path / "g.png")]) == 0
    assert _assert_diffusers_samples_match(run / "round-01-1steps", tmp_path / "export") < 1e-4
    card = (tmp_path / "export" / "README.md").read_text()
    assert "| FID | " in card and "not measured" not in card  # read from the run's summary.json
