"""The pipeline on Ray Train + DeepSpeed in one shared Ray session.

Each paper config, shortened to a tiny model and data but with its own dist settings (ZeRO stage,
precision, offload, teacher precision) on 2 CPU workers, runs one distillation round through the
whole pipeline: Ray Train + DeepSpeed, evaluation as Ray tasks, the report. And an error inside the
workers that a restart would meet again stops the stage at once, as one message."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
import time
from pathlib import Path

import pytest

from tests.teachers import perturbed_denoiser

ROOT = Path(__file__).resolve().parents[2]
PAPER = ["cifar10.yaml", "imagenet64.yaml", "lsun_bedroom128.yaml", "lsun_church128.yaml"]
SHRINK = ["data.source=digits", "data.resolution=8", "data.channels=1", "data.random_flip=false",
          "data.loader_workers=1", "data.shuffle_buffer=64", "model.ch=32", "model.ch_mult=[1,2]",
          "model.num_res_blocks=1", "model.attn_resolutions=[4]", "teacher.sampling_steps=2", "distill.start_steps=2",
          "distill.updates_per_round=4", "distill.batch_size=8", "eval.extractor=classifier", "eval.num_samples=16",
          "eval.grid_size=16", "eval.reference_samples=64", "eval.classifier_updates=20", "eval.kid=false", "eval.many_step_samples=8", "eval.reference_steps=0",
          "dist.workers=2", "dist.use_gpu=false", "dist.checkpoint_every=2", "dist.collective_timeout_s=120",
          "run.device=cpu"]


@pytest.fixture(scope="module")
def ray_session():
    import ray

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    # a custom resource stands in for an accelerator a node type offers
    ray.init(num_cpus=4, resources={"raypd_slot": 2}, include_dashboard=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.mark.parametrize("name", PAPER)
def test_paper_config_runs_a_round_on_cpu_with_its_dist_settings(ray_session, tmp_path, name):
    from raypd.checkpoint import meta_for, save_checkpoint
    from raypd.config import load_config
    from raypd.distill import main

    paper = load_config(ROOT / "configs" / name)
    classes = ["data.num_classes=10"] if paper.data.num_classes else []
    cfg = load_config(ROOT / "configs" / name, SHRINK + classes)
    save_checkpoint(tmp_path / "teacher", perturbed_denoiser(cfg),
                    meta_for(cfg, kind="teacher", sampling_steps=2, round=None))
    args = ["--config", str(ROOT / "configs" / name), *SHRINK, *classes, f"teacher.checkpoint={tmp_path / 'teacher'}",
            f"run.storage_path={tmp_path}", "run.name=r"]
    assert main(args) == 0
    run = tmp_path / "r"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final_checkpoint"] == "round-00-1steps"
    meta = json.loads((run / "round-00-1steps" / "meta.json").read_text())
    saved = meta["config"]["dist"]
    for key in ("zero_stage", "precision", "offload_optimizer", "offload_params", "teacher_dtype"):
        assert saved[key] == getattr(paper.dist, key), key  # the paper config's own settings ran
    assert meta["metrics"]["skipped_updates"] == 0
    assert summary["rounds"][0]["final_loss"] > 0


def test_an_error_every_restart_would_repeat_stops_the_stage_at_once(ray_session, tmp_path, capsys):
    from raypd.checkpoint import meta_for, save_checkpoint
    from raypd.config import load_config
    from raypd.distill import main

    from raypd.config import DataConfig
    from raypd.data.prepare import training_shards

    # labelled shards with every other image unreadable: the driver's evaluation skips those, the workers'
    # loaders give up on them (data.max_skipped_fraction), a failure every restart would meet again
    shards = tmp_path / "shards"
    shards.mkdir()
    for url in training_shards(DataConfig(source="digits", resolution=8), tmp_path / "clean"):
        with tarfile.open(url) as src, tarfile.open(shards / Path(url).name, "w") as dst:
            for i, member in enumerate(src.getmembers()):
                data = src.extractfile(member).read()
                if member.name.endswith(".png") and i % 4 == 1:
                    data = b"not an image" * 8
                member.size = len(data)
                dst.addfile(member, io.BytesIO(data))
    shutil.copy(Path(url).parent / "manifest.json", shards / "manifest.json")
    base = [*SHRINK, "data.source=shards", f"data.shards={shards}/train-{{000000..000015}}.tar", "data.loader_workers=0",
            "data.max_skipped_fraction=0.05", "distill.batch_size=128", "dist.max_failures=2", "dist.precision=fp32",
            "dist.zero_stage=2"]
    cfg = load_config(None, base)
    save_checkpoint(tmp_path / "teacher", perturbed_denoiser(cfg),
                    meta_for(cfg, kind="teacher", sampling_steps=2, round=None))
    began = time.perf_counter()
    code = main([*base, f"teacher.checkpoint={tmp_path / 'teacher'}", f"run.storage_path={tmp_path}", "run.name=r"])
    err = capsys.readouterr().err
    assert code == 2
    assert "data error: round 0: DataError:" in err and "were corrupt or unreadable" in err
    assert err.count("Ray Train run on 2 worker(s)") == 1
    assert "TrainingFailedError" not in err and "Traceback" not in err
    assert time.perf_counter() - began < 120, "the worker group was restarted"
    assert not (tmp_path / "r" / "round-00-1steps").exists()


def test_local_mode_and_one_ray_worker_run_the_same_loop(ray_session, tmp_path):
    """Same seed, ``dist.workers=0`` (in this process, plain PyTorch) and ``dist.workers=1`` (a Ray Train worker on
    DeepSpeed): the same loss at every update of teacher training and of a round, and the same weights after."""
    import torch
    from safetensors.torch import load_file

    from raypd.config import load_config
    from raypd.data.prepare import training_shards
    from raypd.distributed.trainer import run_stage
    from raypd.methods import method_for, objective_for
    from raypd.train.runner import InProcessRunner
    from raypd.train.stage import round_stage, teacher_stage
    from tests.recorder import MetricsToFile

    updates = 6
    base = ["data.resolution=8", "model.attn_resolutions=[4]", "model.ch=32", "model.ch_mult=[1,2]",
            "teacher.sampling_steps=4", "distill.start_steps=4", "teacher.batch_size=16", "distill.batch_size=16",
            "teacher.warmup_updates=2", "data.loader_workers=0", "run.device=cpu", "dist.checkpoint_every=1",
            f"dist.keep_checkpoints={updates}", "dist.zero_stage=2", "dist.precision=fp32",
            "dist.collective_timeout_s=120"]
    local, ray1 = load_config(None, base + ["dist.workers=0"]), load_config(None, base + ["dist.workers=1"])
    shards = training_shards(local.data, tmp_path / "data", seed=local.run.seed)
    curves: dict[str, dict[str, list[float]]] = {"local": {}, "ray": {}}
    weights: dict[str, dict[str, dict]] = {"local": {}, "ray": {}}

    runner = InProcessRunner(local, tmp_path / "local", torch.device("cpu"),
                             objectives=lambda stage: objective_for(local, stage))
    record = tmp_path / "ray-metrics.jsonl"
    for kind in ("teacher", "round"):
        # both rounds distil the teacher trained in this process
        stage = (teacher_stage(updates, 4, shards) if kind == "teacher" else
                 round_stage(method_for(local).plan()[0], tmp_path / "local" / "teacher-out", shards))
        stage = stage.with_(updates=updates)
        for mode in ("local", "ray"):
            out = tmp_path / mode / f"{kind}-out"
            if mode == "local":
                runner.run(stage, out)
                folders = sorted((tmp_path / "local" / stage.name).glob("checkpoint_*"))
                reported = [json.loads((f / "metrics.json").read_text()) for f in folders]
            else:
                record.unlink(missing_ok=True)
                run_stage(ray1, stage, storage=tmp_path / "ray", output=out,
                          callbacks=[MetricsToFile(str(record))])
                reported = [json.loads(line)[0] for line in record.read_text().splitlines()]
            curves[mode][kind] = [m["loss"] for m in sorted(reported, key=lambda m: m["update"])]
            weights[mode][kind] = load_file(str(out / "model.safetensors"))
    print(json.dumps(curves))
    for kind in ("teacher", "round"):
        assert len(curves["local"][kind]) == updates, curves
        assert curves["ray"][kind] == pytest.approx(curves["local"][kind], rel=1e-4), kind
        a, b = weights["local"][kind], weights["ray"][kind]
        assert sorted(a) == sorted(b)
        assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4, kind


def test_workers_reserve_the_resources_asked_for(ray_session, tmp_path, capsys):
    """``dist.resources_per_worker`` naming a custom resource: 2 workers fit the session's 2 slots and train a round;
    3 do not, and the run stops before training with a message naming what is short."""
    from raypd.checkpoint import meta_for, save_checkpoint
    from raypd.config import load_config
    from raypd.distill import main

    args = [*SHRINK, "dist.resources_per_worker={CPU: 1, raypd_slot: 1}", f"teacher.checkpoint={tmp_path / 'teacher'}",
            f"run.storage_path={tmp_path}"]
    cfg = load_config(None, args)
    save_checkpoint(tmp_path / "teacher", perturbed_denoiser(cfg), meta_for(cfg, kind="teacher", sampling_steps=2,
                                                                          round=None))
    assert main([*args, "run.name=fits"]) == 0
    assert (tmp_path / "fits" / "round-00-1steps" / "model.safetensors").is_file()
    capsys.readouterr()
    assert main([*args, "dist.workers=3", "distill.batch_size=9", "teacher.batch_size=9", "run.name=short"]) == 2
    err = capsys.readouterr().err
    assert "cluster error: dist.workers=3 workers of {CPU: 1, raypd_slot: 1} each do not fit" in err
    assert "short of raypd_slot (needs 3, the cluster has 2)" in err
    assert not (tmp_path / "short" / "round-00-1steps").exists()


def test_raypd_fid_scores_several_checkpoints_on_ray_tasks_as_one_process_would(ray_session, tmp_path, capsys):
    """``raypd fid --workers``: two checkpoints at two step counts in one call, sampled and scored on Ray tasks
    through the run's chunk path; the same numbers as the same points scored in this process."""
    from raypd.checkpoint import meta_for, save_checkpoint
    from raypd.cli import main as cli
    from raypd.config import load_config

    cfg = load_config(None, [*SHRINK, "dist.workers=0", "eval.chunk_size=256"])
    run = tmp_path / "run"
    save_checkpoint(run / "teacher", perturbed_denoiser(cfg, 0.02), meta_for(cfg, kind="teacher", sampling_steps=2,
                                                                          round=None))
    save_checkpoint(run / "round-00-1steps", perturbed_denoiser(cfg, 0.05), meta_for(cfg, kind="student",
                                                                                    sampling_steps=1, round=0))
    checkpoints = [str(run / "teacher"), str(run / "round-00-1steps")]
    args = ["fid", "--checkpoint", *checkpoints, "--steps", "2", "1", "--n", "300"]
    assert cli([*args, "--workers", "2", "--table", str(tmp_path / "t.md")]) == 0
    on_ray = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert cli(args) == 0
    here = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [(Path(r["checkpoint"]).name, r["steps"]) for r in on_ray] == [
        ("teacher", 2), ("teacher", 1), ("round-00-1steps", 2), ("round-00-1steps", 1)]
    for a, b in zip(on_ray, here):
        assert a["fid"] == pytest.approx(b["fid"], rel=1e-4) and a["n_samples"] == b["n_samples"] == 300
    assert len({r["fid"] for r in on_ray}) == 4  # four different points
    assert (tmp_path / "t.md").read_text().count("| 300 |") == 4
