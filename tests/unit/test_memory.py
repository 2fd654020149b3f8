"""The dry run's per-GPU memory estimate and its cost model."""

from __future__ import annotations

from pathlib import Path

import pytest

from raypd.config import ConfigError, load_config
from raypd.memory import GIB, activation_gib, describe_memory, stage_memory
from raypd.models import count_parameters

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _paper(name: str, *overrides: str):
    cfg = load_config(CONFIGS / name, list(overrides))
    return cfg, count_parameters(cfg.model, cfg.data)


def test_the_paper_configs_fit_the_cluster_files_40_gb_a100s():
    for name in ("cifar10.yaml", "imagenet64.yaml", "lsun_bedroom128.yaml", "lsun_church128.yaml"):
        cfg, params = _paper(name)
        lines, warnings = describe_memory(cfg, params, trains_teacher=True)
        assert not warnings, (name, lines)
        assert "A100-40G, 40 GiB" in lines[0]


def test_the_parts_follow_zero_precision_and_the_stage():
    cfg, params = _paper("imagenet64.yaml")
    p = params / GIB
    teacher, round_ = stage_memory(cfg, params, distills=False), stage_memory(cfg, params, distills=True)
    assert teacher.micro_batch == round_.micro_batch == 2048 // 32
    assert teacher.parts["weights"] == pytest.approx(2 * p)  # bf16 weights, whole on every rank under ZeRO-2
    assert teacher.parts["optimizer"] == pytest.approx(12 * p / 32)  # Adam moments + fp32 master, sharded
    assert teacher.parts["EMA"] == pytest.approx(4 * p) and "teacher" not in teacher.parts
    assert cfg.dist.use_gpu and round_.parts["teacher"] == pytest.approx(2 * p)  # teacher_dtype auto on GPUs: bf16
    assert teacher.parts["ZeRO buckets"] == pytest.approx(2 * 50_000_000 * 2 * 4.5 / GIB)  # overlapped buckets
    serial = stage_memory(load_config(CONFIGS / "imagenet64.yaml", ["dist.overlap_comm=false"]), params, distills=True)
    assert serial.parts["ZeRO buckets"] == pytest.approx(2 * 50_000_000 * 2 / GIB)
    zero3 = stage_memory(load_config(CONFIGS / "imagenet64.yaml", ["dist.zero_stage=3"]), params, distills=True)
    assert zero3.parts["weights"] == pytest.approx(2 * p / 32)
    offloaded = stage_memory(load_config(CONFIGS / "imagenet64.yaml", ["dist.offload_optimizer=true"]), params,
                             distills=True)
    assert offloaded.parts["optimizer"] == 0


def test_activations_are_measured_and_checkpointing_cuts_them():
    cfg = load_config(None, ["data.resolution=16", "dist.workers=2"])
    one, four = activation_gib(cfg, 1), activation_gib(cfg, 4)
    assert four == pytest.approx(4 * one, rel=0.01) and one > 0  # linear in the micro-batch
    checkpointed = activation_gib(load_config(None, ["data.resolution=16", "dist.gradient_checkpointing=true"]), 4)
    assert 0.2 * four < checkpointed < 0.7 * four  # the blocks' inputs stay, their insides are recomputed


def test_a_run_that_does_not_fit_is_warned_about_in_the_dry_run(capsys):
    from raypd.distill import main

    args = ["--dry-run", "--config", str(CONFIGS / "imagenet64.yaml"), "dist.accelerator_type=T4"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "GPU memory per rank, estimated (against T4, 16 GiB)" in out
    assert "warning  memory: a teacher stage needs about" in out and "dist.gradient_checkpointing=true" in out
    assert "14.7% of the 312 TFLOP/s bf16 peak, from EDM's ImageNet-64 training" in out
    assert "of evaluation" in out and "checkpoint writes" in out


def test_the_dry_run_says_what_a_checkpoint_interval_holds(capsys):
    from raypd.distill import main

    assert main(["--dry-run", "--config", str(CONFIGS / "imagenet64.yaml")]) == 0
    out = capsys.readouterr().out
    # background uploads: a node lost mid-upload falls back one more interval
    assert ("checkpoints: every 250 updates (async upload), a lost node costs at most about 12.8 min" in out
            and "dist.checkpoint_every:" not in out)
    assert main(["--dry-run", "--config", str(CONFIGS / "imagenet64.yaml"), "dist.checkpoint_upload=sync"]) == 0
    assert "checkpoints: every 250 updates (sync upload), a lost node costs at most about 6.4 min" in \
        capsys.readouterr().out
    assert main(["--dry-run", "--config", str(CONFIGS / "imagenet64.yaml"), "dist.checkpoint_every=5000"]) == 0
    assert ("warning  dist.checkpoint_every: 5,000 updates (async upload) risk about 256 min of work, more than 15 min"
            in capsys.readouterr().out)


def test_the_plan_counts_the_image_forwards_the_evaluator_runs():
    from raypd.plan import eval_forwards

    # the teacher's 64-step sampler, its DDIM at 16, 8, 4, 2 and 1 steps, and each student at its own steps
    assert eval_forwards(load_config(None)) == 1024 * (64 + 31 + 31)
    assert eval_forwards(load_config(None, ["eval.stochastic=true", "eval.num_samples=10"])) == 10 * (64 + 3 * 31)
    assert eval_forwards(load_config(None, ["eval.reference_steps=16", "eval.num_samples=10"])) == 10 * (16 + 15 + 31)


def test_the_plan_scores_many_step_points_with_fewer_samples_or_not_at_all():
    from raypd.eval.budget import EvalPlan
    from raypd.plan import eval_forwards

    cfg = load_config(None, ["eval.max_standard_steps=4", "eval.many_step_samples=256", "eval.num_samples=1024"])
    plan = EvalPlan.of(cfg)
    assert [plan.samples(n) for n in (16, 8, 4, 2, 1)] == [256, 256, 1024, 1024, 1024]
    # the full sampler always gets the standard count; the teacher's DDIM and the students follow the plan
    assert plan.teacher_points([16, 8, 4, 2, 1]) == [("teacher_ddim", 16, 256), ("teacher_ddim", 8, 256),
                                                     ("teacher_ddim", 4, 1024), ("teacher_ddim", 2, 1024),
                                                     ("teacher_ddim", 1, 1024)]
    assert eval_forwards(cfg) == 1024 * 64 + 2 * (256 * 24 + 1024 * 7)
    skip = load_config(None, ["eval.max_standard_steps=4", "eval.num_samples=10"])
    assert eval_forwards(skip) == 10 * (64 + 2 * 7)
    with pytest.raises(ConfigError, match="eval.many_step_samples"):
        load_config(None, ["eval.max_standard_steps=4", "eval.many_step_samples=2048", "eval.num_samples=1024"])


@pytest.mark.parametrize("name", ["cifar10", "imagenet64", "imagenet64_guided", "lsun_bedroom128", "lsun_church128"])
def test_every_paper_config_spends_at_most_a_tenth_of_its_training_on_evaluation(name, capsys):
    import re

    from raypd.distill import main

    assert main(["--config", str(CONFIGS / f"{name}.yaml"), "--dry-run"]) == 0
    text = capsys.readouterr().out
    share = float(re.search(r"evaluation is ([0-9.]+)% of the training compute", text).group(1))
    assert 0 < share <= 10.0, text
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert cfg.eval.num_samples == 50000  # the final students are still scored at the standard protocol
