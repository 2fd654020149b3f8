"""configs/: every file loads, and the paper's setups hold the paper's settings (Salimans & Ho 2022)."""

from __future__ import annotations

from pathlib import Path

import pytest

from raypd.config import Config, load_config
from raypd.models.build import count_parameters
from raypd.methods import method_for

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))

# Shared by the four paper setups.
COMMON = {
    "data.source": "shards", "data.channels": 3, "data.random_flip": True,
    "diffusion.weighting": "snr_trunc", "diffusion.logsnr_min": -20.0, "diffusion.logsnr_max": 20.0,
    "model.num_res_blocks": 3,
    "teacher.checkpoint": "", "teacher.ema_decay": 0.9999, "teacher.adam_betas": (0.9, 0.999), "teacher.grad_clip": 1.0,
    "distill.end_steps": 1, "distill.updates_per_round": 50000,
    "distill.late_rounds_factor": 2.0, "distill.late_rounds_max_steps": 2,
    "distill.adam_betas": (0.9, 0.999), "distill.grad_clip": 1.0,
    "eval.extractor": "inception", "eval.num_samples": 50000,
    "dist.use_gpu": True, "dist.precision": "bf16",
}
# ImageNet 64 and LSUN 128 share the teacher and distillation settings (the paper's table).
LARGE = {
    "model.parameterization": "both", "model.dropout": 0.1, "model.attn_resolutions": (8, 16, 32),
    "teacher.batch_size": 2048, "teacher.lr": 3e-4, "teacher.sampling_steps": 1024,
    "distill.start_steps": 1024, "distill.batch_size": 2048, "distill.lr": 1e-4,
}
LSUN = {**LARGE, "model.ch": 64, "model.ch_mult": (1, 2, 4, 6, 8), "data.resolution": 128, "data.num_classes": 0}
PAPER = {
    "cifar10.yaml": {
        "model.parameterization": "x", "model.ch": 256, "model.ch_mult": (1, 1, 1),
        "model.attn_resolutions": (8, 16), "model.dropout": 0.2,
        "teacher.batch_size": 128, "teacher.lr": 2e-4, "teacher.sampling_steps": 8192,
        "distill.start_steps": 8192, "distill.batch_size": 128, "distill.lr": 5e-5,
        "data.resolution": 32, "data.num_classes": 0,
    },
    "imagenet64.yaml": {**LARGE, "model.ch": 192, "model.ch_mult": (1, 2, 3, 4),
                        "data.resolution": 64, "data.num_classes": 1000},
    "lsun_bedroom128.yaml": LSUN,
    "lsun_church128.yaml": LSUN,
}
# (rounds, parameters in millions, tolerance): CIFAR-10 8192 -> 1 is 13 rounds, the others 1024 -> 1
# is 10. LSUN's count is raypd's (time embedding 4 * ch wide; the official model's is 768, ~140M).
SHAPES = {"cifar10.yaml": (13, 60.0, 0.1), "imagenet64.yaml": (10, 296.0, 0.5),
          "lsun_bedroom128.yaml": (10, 126.2, 0.2), "lsun_church128.yaml": (10, 126.2, 0.2)}


def paper(name: str) -> Config:
    return load_config(ROOT / "configs" / name)


def setting(cfg: Config, dotted: str):
    section, key = dotted.split(".")
    return getattr(getattr(cfg, section), key)


def test_the_paper_configs_exist():
    assert set(PAPER) <= {p.name for p in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_loads(path):
    load_config(path)


@pytest.mark.parametrize("name", PAPER)
def test_paper_settings(name):
    cfg = paper(name)
    expected = {**COMMON, **PAPER[name]}
    actual = {key: setting(cfg, key) for key in expected}
    assert actual == expected


@pytest.mark.parametrize("name", PAPER)
def test_rounds_and_their_budgets(name):
    rounds = method_for(paper(name)).plan()
    assert len(rounds) == SHAPES[name][0]
    assert [r.student_steps for r in rounds][-3:] == [4, 2, 1]
    assert [r.updates for r in rounds] == [50000] * (len(rounds) - 2) + [100000, 100000]


@pytest.mark.parametrize("name", PAPER)
def test_batches_split_over_the_workers(name):
    cfg = paper(name)
    assert cfg.dist.workers >= 8 and cfg.dist.workers % 8 == 0  # whole 8-GPU nodes
    for batch in (cfg.teacher.batch_size, cfg.distill.batch_size):
        assert batch % cfg.dist.workers == 0 and batch // cfg.dist.workers >= 16


@pytest.mark.parametrize("name", PAPER)
def test_zero_stage_keeps_the_teachers_ema_cheap(name):
    cfg = paper(name)
    # Teacher training keeps an EMA of whole weights on every rank: under ZeRO-3 every update would gather
    # all the weights once more for it, and these models fit unpartitioned.
    assert cfg.dist.zero_stage in (1, 2)


@pytest.mark.parametrize("name", PAPER)
def test_parameter_count_matches_the_paper_setup(name):
    cfg = paper(name)
    _, millions, tolerance = SHAPES[name]
    assert count_parameters(cfg.model, cfg.data) / 1e6 == pytest.approx(millions, abs=tolerance)


def test_the_two_lsun_configs_differ_only_in_data_and_name():
    bedroom, church = paper("lsun_bedroom128.yaml").to_dict(), paper("lsun_church128.yaml").to_dict()
    assert bedroom["data"]["shards"] != church["data"]["shards"]
    assert bedroom["run"]["name"] != church["run"]["name"]
    for cfg in (bedroom, church):
        del cfg["data"]["shards"], cfg["run"]["name"]
    assert bedroom == church


@pytest.mark.parametrize("name", PAPER)
def test_runs_keep_their_files_in_a_bucket(name):
    assert paper(name).run.storage_path.startswith("s3://")


def test_the_guided_imagenet_config_is_imagenet64_with_guidance_and_its_dry_run_plans_it(tmp_path, capsys):
    guided, plain = paper("imagenet64_guided.yaml"), paper("imagenet64.yaml")
    assert (guided.model.class_dropout, guided.distill.guidance_min, guided.distill.guidance_max) == (0.1, 0.0, 4.0)
    assert guided.eval.guidance == (0.0, 0.3, 1.0, 2.0, 4.0)
    a, b = guided.to_dict(), plain.to_dict()
    for cfg in (a, b):
        del cfg["model"]["class_dropout"], cfg["run"]["name"], cfg["eval"]["guidance"]
        for key in ("guidance_min", "guidance_max", "guidance_updates", "guidance_lr", "guidance_embedding_lr_factor",
                    "guidance_endpoints", "guidance_loss_power"):
            del cfg["distill"][key]
    assert a == b  # the paper's network, schedule and budgets otherwise
    # stage one as the paper: at the rounds' rate, the w embedding too, w uniform, every w's loss alike
    d = guided.distill
    assert (d.guidance_lr, d.guidance_embedding_lr_factor, d.guidance_endpoints) == (d.lr, 1.0, 0.0)
    assert d.guidance_loss_power == 0.0
    rounds = method_for(guided).plan()
    assert rounds[0].phase == "guidance" and (rounds[0].teacher_steps, rounds[0].student_steps) == (1024, 1024)
    assert [r.student_steps for r in rounds[1:]] == [512, 256, 128, 64, 32, 16, 8, 4, 2, 1]
    # one extra class embedding, the "no class" label, and no w embedding in the teacher
    assert count_parameters(guided.model, guided.data) - count_parameters(plain.model, plain.data) == 768

    from raypd.distill import main

    assert main(["--config", str(ROOT / "configs" / "imagenet64_guided.yaml"), "--dry-run",
                 f"run.storage_path={tmp_path}"]) == 0
    out = capsys.readouterr()
    text = out.out + out.err
    assert "1024->1024 (guidance)" in text and "round 10" in text and "dry run: nothing was started" in text
