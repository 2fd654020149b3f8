"""Distributed settings that cannot work are refused before any training, each naming what is wrong."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from raypd.config import ConfigError, DataConfig, load_config
from raypd.data.prepare import training_shards
from raypd.data.shards import DataError
from raypd.distributed.deepspeed import ds_config
from raypd.distributed.guards import SETTINGS, dist_settings
from raypd.distributed.trainer import (StageError, check_stages_in_progress, placeable_workers, scaling_config,
                                      worker_bundle)
from raypd.distill import main
from raypd.runs import RAY_JOB_COPY, RunStateError, check_storage_path
from raypd.train.seeds import update_seed


@pytest.mark.parametrize("overrides, key, reason", [
    (["dist.precision=fp16"], "dist.precision", "fp16 needs GPUs"),
    (["dist.zero_stage=0", "dist.offload_optimizer=true"], "dist.offload_optimizer", "needs zero_stage 1, 2 or 3"),
    (["dist.zero_stage=2", "dist.offload_params=true"], "dist.offload_params", "needs zero_stage 3"),
    (["dist.teacher_dtype=fp16"], "dist.teacher_dtype", ""),
    (["dist.workers=0", "dist.precision=bf16"], "dist.precision", "bf16 runs on DeepSpeed workers"),
    (["dist.workers=0", "dist.zero_stage=3", "dist.offload_params=true"], "dist.offload_params",
     "offloading runs on DeepSpeed workers"),
    (["dist.workers=0", "dist.offload_optimizer=true"], "dist.offload_optimizer", "offloading runs on DeepSpeed"),
    (["dist.resources_per_worker={GPU: 1}"], "dist.resources_per_worker", "needs dist.use_gpu=true"),
    (["dist.resources_per_worker={CPU: -1}"], "dist.resources_per_worker", "CPU must be a number >= 0"),
    (["dist.resources_per_worker=[CPU]"], "dist.resources_per_worker", "must be a mapping"),
    (["dist.accelerator_type=H100"], "dist.accelerator_type", "needs dist.use_gpu=true"),
])
def test_settings_that_cannot_run_are_config_errors(overrides, key, reason):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as info:
        load_config(None, overrides)
    assert reason in str(info.value)


def test_offload_lets_deepspeed_take_a_torch_optimizer_and_stage_0_cannot_offload():
    cfg = ds_config(global_batch=8, world_size=2, zero_stage=1, precision="bf16", grad_clip=1.0, offload_optimizer=True)
    assert cfg["zero_force_ds_cpu_optimizer"] is False and cfg["bf16"] == {"enabled": True}
    assert "zero_force_ds_cpu_optimizer" not in ds_config(global_batch=8, world_size=2, zero_stage=1,
                                                          precision="fp32", grad_clip=1.0)
    with pytest.raises(ValueError, match="optimizer offload needs ZeRO stage 1, 2 or 3"):
        ds_config(global_batch=8, world_size=1, zero_stage=0, precision="fp32", grad_clip=1.0, offload_optimizer=True)


def test_workers_are_placed_node_by_node():
    # a GPU on a node without a free CPU, CPUs on a node without a GPU: 1 GPU and 8 CPUs, yet no GPU worker fits
    nodes = [{"Alive": True, "Resources": {"CPU": 0.0, "GPU": 1.0}}, {"Alive": True, "Resources": {"CPU": 8.0}}]
    assert placeable_workers(nodes, {"CPU": 1.0, "GPU": 1.0}) == 0
    assert placeable_workers(nodes, {"CPU": 1.0}) == 8
    nodes = [{"Alive": True, "Resources": {"CPU": 16.0, "GPU": 8.0}}, {"Alive": False, "Resources": {"CPU": 16.0, "GPU": 8.0}},
             {"Alive": True, "Resources": {"CPU": 4.0, "GPU": 8.0}}]
    assert placeable_workers(nodes, {"CPU": 1.0, "GPU": 1.0}) == 12


def test_resources_per_worker_and_accelerator_type_reach_ray_train():
    plain = load_config(None, ["dist.workers=2"])
    assert worker_bundle(plain) == {"CPU": 1.0}
    gpu = load_config(None, ["dist.workers=2", "dist.use_gpu=true", "dist.resources_per_worker={CPU: 8, GPU: 1}",
                             "dist.accelerator_type=H100"])
    bundle = worker_bundle(gpu)
    assert bundle == {"CPU": 8.0, "GPU": 1.0, "accelerator_type:H100": 0.001}
    scaling = scaling_config(gpu)
    assert scaling.num_workers == 2 and scaling.use_gpu and scaling.accelerator_type == "H100"
    assert scaling.resources_per_worker == {"CPU": 8, "GPU": 1}
    # an accelerator type is a node resource: only nodes that offer it count
    nodes = [{"Alive": True, "Resources": {"CPU": 32.0, "GPU": 4.0, "accelerator_type:H100": 1.0}},
             {"Alive": True, "Resources": {"CPU": 32.0, "GPU": 4.0, "accelerator_type:A100": 1.0}}]
    assert placeable_workers(nodes, bundle) == 4
    custom = load_config(None, ["dist.workers=2", "dist.resources_per_worker={CPU: 1, slot: 1}"])
    assert worker_bundle(custom) == {"CPU": 1.0, "slot": 1.0}
    assert scaling_config(custom).resources_per_worker == {"CPU": 1, "slot": 1}


def test_an_autoscalers_published_maximum_bounds_the_workers_and_the_sweep():
    from ray.core.generated import autoscaler_pb2

    from raypd.distributed.cluster import Cluster, capacity

    config = autoscaler_pb2.ClusterConfig()
    gpu = config.node_group_configs.add(name="gpu", max_count=3)
    gpu.resources.update({"CPU": 8, "GPU": 4})
    cpu = config.node_group_configs.add(name="cpu", max_count=10)
    cpu.resources.update({"CPU": 16})
    head = {"Alive": True, "Resources": {"CPU": 4, "node:__internal_head__": 1}}
    assert capacity({"CPU": 2, "GPU": 1}, [head], config) == 12  # 3 nodes x 4 GPUs; the head has none
    assert capacity({"CPU": 1}, [head], config) == 4 + 3 * 8 + 10 * 16
    assert capacity({"CPU": 1, "GPU": 1}, [head], autoscaler_pb2.ClusterConfig()) == 0
    unbounded = autoscaler_pb2.ClusterConfig()
    unbounded.node_group_configs.add(name="any", max_count=-1).resources.update({"GPU": 1})
    assert capacity({"GPU": 1}, [], unbounded) > 10**9
    cfg = load_config(None, ["dist.workers=4", "dist.use_gpu=true", "sweep.enabled=true", "sweep.trials=8"])
    assert Cluster(cfg, autoscaled=True, most=12, request=None).concurrent_trials() == 3  # the target: 12 GPUs / 4
    assert Cluster(cfg, autoscaled=True, most=None, request=None).concurrent_trials() == 8  # Tune queues the rest
    capped = load_config(None, ["dist.workers=4", "sweep.enabled=true", "sweep.max_concurrent=2"])
    assert Cluster(capped, autoscaled=True, most=None, request=None).concurrent_trials() == 2
    # a grid runs every learning rate with every budget and every choice: 2 x 3 x 2 x 3 trials
    grid = load_config(None, ["dist.workers=1", "sweep.enabled=true", "sweep.lrs=[1e-3,3e-4]", "sweep.updates=[1,2,4]",
                              "sweep.choices=[distill.batch_size=16|32, distill.grad_clip=0.5|1.0|2.0]"])
    assert grid.sweep.trials_per_round() == 36
    assert Cluster(grid, autoscaled=True, most=None, request=None).concurrent_trials() == 36


def test_a_sweep_at_equal_examples_gives_each_batch_size_its_own_budget():
    """``sweep.examples``: a trial's budget is the examples over its batch size, in a grid and in a random search
    (where Tune draws the batch first), and ASHA's horizon is the largest of those budgets."""
    from ray.tune.search.variant_generator import generate_variants

    from raypd.distributed.sweep import round_budgets, search_space

    fixed = ["sweep.enabled=true", "sweep.examples=12800", "sweep.choices=[distill.batch_size=8|16|32]"]
    grid = load_config(None, [*fixed, "sweep.lrs=[3e-4,1e-3]"])
    assert grid.sweep.trials_per_round() == 6
    assert round_budgets(grid, planned_updates=800) == [1600, 800, 400]
    space, first = search_space(grid, 800, None)
    drawn = sorted((v["lr"], v["distill.batch_size"], v["updates"]) for _, v in generate_variants(space))
    assert drawn == sorted((lr, b, 12800 // b) for lr in (3e-4, 1e-3) for b in (8, 16, 32)) and first is None
    random = load_config(None, [*fixed, "sweep.trials=6"])
    space, first = search_space(random, 800, {"lr": 1e-3, "updates": 800, "distill.batch_size": 16})
    assert first == {"lr": 1e-3, "distill.batch_size": 16}  # Tune works its budget out
    for _ in range(6):
        for _, v in generate_variants(space):
            assert v["updates"] == 12800 // v["distill.batch_size"], v
    for _, v in generate_variants({**space, **first}):
        assert (v["lr"], v["distill.batch_size"], v["updates"]) == (1e-3, 16, 800)
    alone = load_config(None, ["sweep.enabled=true", "sweep.examples=100", "distill.batch_size=32"])
    assert round_budgets(alone, planned_updates=800) == [3] and search_space(alone, 800, None)[1]["updates"] == 3
    assert round_budgets(load_config(None, ["sweep.updates=[4,8]"]), 800) == [4, 8]
    assert round_budgets(load_config(None, []), 800) == [800]


def test_the_autoscaler_is_asked_for_every_worker_and_for_evaluation_tasks_no_worker_bundle_holds():
    from raypd.distributed.cluster import request_bundles

    gpu = load_config(None, ["dist.workers=8", "dist.use_gpu=true"])
    assert request_bundles(gpu) == [{"CPU": 1.0, "GPU": 1.0}] * 8  # evaluation tasks fit the workers' bundles
    assert request_bundles(gpu, trials=3) == [{"CPU": 1.0, "GPU": 1.0}] * 24
    slots = load_config(None, ["dist.workers=2", "dist.resources_per_worker={raypd_slot: 1}"])
    assert request_bundles(slots) == [{"raypd_slot": 1.0}] * 2 + [{"CPU": 1.0}] * 2
    quiet = load_config(None, ["dist.workers=2", "dist.resources_per_worker={raypd_slot: 1}",
                               "eval.distributed=false"])
    assert request_bundles(quiet) == [{"raypd_slot": 1.0}] * 2


def test_scale_timeout_must_be_positive():
    with pytest.raises(ConfigError, match=r"dist\.scale_timeout_s"):
        load_config(None, ["dist.scale_timeout_s=0"])


def test_tiny_zero_buckets_are_refused():
    with pytest.raises(ConfigError, match=r"dist\.bucket_elements: must be >= 1000000"):
        load_config(None, ["dist.bucket_elements=1000"])


def test_relative_storage_inside_a_ray_job_copy_is_refused():
    job_copy = f"/tmp/ray/session_x/{RAY_JOB_COPY}/_ray_pkg_0123abcd"
    with pytest.raises(RunStateError, match="is relative, and this job runs in Ray's per-job copy"):
        check_storage_path("raypd_runs", cwd=job_copy)
    check_storage_path("/mnt/shared/runs", cwd=job_copy)
    check_storage_path("raypd_runs", cwd="/home/me/project")


def test_relative_storage_inside_a_ray_job_copy_fails_the_dry_run(tmp_path, monkeypatch, capsys):
    job_copy = tmp_path / RAY_JOB_COPY / "_ray_pkg_0123abcd"
    job_copy.mkdir(parents=True)
    monkeypatch.chdir(job_copy)
    assert main(["--dry-run", "run.storage_path=raypd_runs"]) == 2
    assert "error    run.storage_path:" in capsys.readouterr().out


def _in_progress(out: Path, stage: str, **settings) -> None:
    cfg = load_config(None, [f"dist.{k}={v}" for k, v in settings.items() if k != "workers"]
                      + [f"dist.workers={settings.get('workers', 1)}"])
    checkpoint = out / "ray" / stage / "checkpoint_2026-01-01_00-00-00.000000"
    checkpoint.mkdir(parents=True)
    (checkpoint / SETTINGS).write_text(json.dumps(dist_settings(cfg, cfg.dist.workers)))


def test_a_stage_in_progress_under_other_dist_settings_is_refused_by_name(tmp_path):
    _in_progress(tmp_path, "round-01", workers=2, zero_stage=2, precision="bf16")
    same = load_config(None, ["dist.workers=2", "dist.precision=bf16"])
    check_stages_in_progress(same, tmp_path)
    other = load_config(None, ["dist.workers=1", "dist.zero_stage=3", "dist.precision=bf16"])
    with pytest.raises(StageError, match=r"stage round-01 is in progress .*dist\.workers=2 \(now 1\), "
                                         r"dist\.zero_stage=2 \(now 3\)"):
        check_stages_in_progress(other, tmp_path)
    # once the stage has finished, its Ray run no longer matters
    (tmp_path / "round-01-4steps").mkdir()
    (tmp_path / "round-01-4steps" / "meta.json").write_text("{}")
    check_stages_in_progress(other, tmp_path)


def test_shards_are_counted_against_every_workers_loader_processes(tmp_path, capsys):
    urls = training_shards(DataConfig(source="digits", resolution=8), tmp_path / "data")
    assert len(urls) == 16
    code = main(["dist.workers=4", "data.loader_workers=6", "data.source=shards", f"data.shards={','.join(urls)}",
                 "data.resolution=8", f"run.storage_path={tmp_path}"])
    assert code == 2
    assert "data error: 16 shards for 4 ranks x 6 loader workers" in capsys.readouterr().err


def test_local_sources_are_cut_into_a_shard_per_reader(tmp_path):
    urls = training_shards(DataConfig(source="digits", resolution=8), tmp_path, readers=24)
    assert len(urls) == 24
    with pytest.raises(DataError, match="cannot fill a shard for each of the 4000 readers"):
        training_shards(DataConfig(source="digits", resolution=8), tmp_path, readers=4000)


def test_update_seeds_differ_across_ranks_and_updates_and_repeat_exactly():
    seeds = {update_seed(0, stream, rank, k) for stream in range(3) for rank in range(64) for k in range(1, 200)}
    assert len(seeds) == 3 * 64 * 199
    assert update_seed(5, 1, 3, 17) == update_seed(5, 1, 3, 17) != update_seed(6, 1, 3, 17)


def test_teacher_in_bf16_computes_its_target_in_fp32():
    import torch

    from raypd.diffusion import logsnr_schedule
    from raypd.models import build_denoiser
    from raypd.train import freeze
    from raypd.methods.progressive import HalvingRound
    from raypd.methods.regression import bare
    from raypd.train.objective import frozen_dtype, frozen_forward

    assert frozen_dtype("auto", torch.device("cpu")) is None  # CPUs: fp32 unless asked
    assert frozen_dtype("bf16", torch.device("cpu")) is torch.bfloat16
    assert frozen_dtype("fp32", torch.device("cuda")) is None
    cfg = load_config(None, ["data.resolution=8", "model.attn_resolutions=[4]"])
    torch.manual_seed(0)
    teacher = build_denoiser(cfg.model, cfg.data)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    teacher = freeze(teacher)
    z = torch.randn(16, 1, 8, 8)
    t = (torch.arange(16) % 4 + 1).float() / 4
    objective = bare(HalvingRound, student_steps=4, logsnr_fn=logsnr_schedule)

    def target(dtype):
        with frozen_forward(z, dtype):
            return objective.target({"teacher": teacher}, z, t, None, None).to(z.dtype).clone()

    full, half = target(None), target(torch.bfloat16)
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
    assert not torch.equal(half, full)  # the network did run in bf16
    # bf16's 8-bit mantissa in the network, not in the inversion: the target moves by about its rounding
    assert float((half - full).abs().max()) < 0.05 * float(full.abs().max())


@pytest.mark.parametrize("loader_workers", [0, 1])
def test_the_next_pass_of_a_loader_reads_what_a_loader_started_at_that_window_reads(tmp_path, loader_workers):
    """How a stage resumed at a checkpoint sees the batches an uninterrupted one saw (StageLoop.batches)."""
    import torch

    from raypd.data.shards import ShardLoader

    urls = training_shards(DataConfig(source="digits", resolution=8), tmp_path)
    opts = dict(batch_size=8, channels=1, num_classes=0, num_workers=loader_workers, seed=3, shuffle_buffer=32,
                resampled=True, resolution=8)
    through = ShardLoader(urls, epoch=0, **opts)
    first = next(iter(through)).x
    second = [b.x for _, b in zip(range(3), iter(through))]  # the next window: the loader's next pass
    resumed = [b.x for _, b in zip(range(3), iter(ShardLoader(urls, epoch=1, **opts)))]
    assert all(torch.equal(a, b) for a, b in zip(second, resumed))
    assert not torch.equal(first, second[0])


def test_the_dry_run_asks_the_cluster_it_is_pointed_at(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(["--dry-run", "dist.workers=2", f"run.storage_path={tmp_path}"]) == 0
    assert "cluster: not asked (no RAY_ADDRESS)" in capsys.readouterr().out


def test_lost_nodes_are_told_apart_by_rays_death_reason(monkeypatch):
    import ray

    from raypd.distributed.cluster import FAILED, PREEMPTED, describe_losses, node_losses

    nodes = [{"NodeID": "a" * 20, "Alive": False, "DeathReason": 3, "DeathReasonMessage": "spot reclaimed"},
             {"NodeID": "b" * 20, "Alive": False, "DeathReason": 2, "DeathReasonMessage": "health check failed"},
             {"NodeID": "c" * 20, "Alive": False, "DeathReason": 4, "DeathReasonMessage": "idle"},
             {"NodeID": "d" * 20, "Alive": True, "DeathReason": 0},
             {"NodeID": "e" * 20, "Alive": False, "DeathReason": 2},  # dead before the stage began
             # removed as idle by the v1 autoscaler (as its fake_multinode provider shows): not a loss
             {"NodeID": "f" * 20, "Alive": False, "DeathReason": 1, "DeathReasonMessage": "Terminated by autoscaler."},
             # stopped on purpose by someone else while the stage ran: a loss
             {"NodeID": "g" * 20, "Alive": False, "DeathReason": 1, "DeathReasonMessage": "received SIGTERM"}]
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    losses = node_losses({"a" * 20, "b" * 20, "c" * 20, "d" * 20, "f" * 20, "g" * 20})
    assert [(node, kind) for node, kind, _ in losses] == [("a" * 20, PREEMPTED), ("b" * 20, FAILED),
                                                          ("g" * 20, FAILED)]
    assert describe_losses(losses[:2]) == ("node aaaaaaaaaaaa preempted (spot reclaimed); "
                                           "node bbbbbbbbbbbb lost (health check failed)")


def test_a_rounds_trials_are_drawn_once_seeded_and_kept_as_json(tmp_path):
    """The trials a sweep runs are raypd's own draw (Tune's generator, seeded), written to ``plan.json`` on the first
    start and read back on later ones: a resumed sweep runs the same trials without reading Tune's state."""
    from raypd.distributed.sweep import PLAN, draw_trials, plan_trials, search_space

    fixed = ["sweep.enabled=true", "sweep.examples=12800", "sweep.choices=[distill.batch_size=8|16|32]"]
    grid = load_config(None, [*fixed, "sweep.lrs=[3e-4,1e-3]"])
    space, first = search_space(grid, 800, None)
    trials = draw_trials(grid, space, first, seed=0)
    assert list(trials) == [f"t{i:02d}" for i in range(6)]
    assert sorted((t["lr"], t["distill.batch_size"], t["updates"]) for t in trials.values()) == sorted(
        (lr, b, 12800 // b) for lr in (3e-4, 1e-3) for b in (8, 16, 32))
    random = load_config(None, [*fixed, "sweep.trials=5", "sweep.lr_min=1e-4", "sweep.lr_max=1e-2"])
    space, first = search_space(random, 800, {"lr": 1e-3, "updates": 800, "distill.batch_size": 16})
    drawn = draw_trials(random, space, first, seed=3)
    assert len(drawn) == 5 and drawn["t00"] == {"lr": 1e-3, "distill.batch_size": 16, "updates": 800}
    assert all(t["updates"] == 12800 // t["distill.batch_size"] and 1e-4 / 10 <= t["lr"] <= 1e-2 * 10
               for t in drawn.values())
    assert len({t["lr"] for t in drawn.values()}) == 5
    assert draw_trials(random, space, first, seed=3) == drawn != draw_trials(random, space, first, seed=4)
    assert plan_trials(random, str(tmp_path), space, first, seed=3) == drawn
    # a later start reads the plan back, whatever it would draw now
    assert plan_trials(random, str(tmp_path), space, first, seed=99) == drawn
    assert json.loads((tmp_path / PLAN).read_text())["trials"] == drawn


def test_a_sweeps_table_is_read_from_its_trials_records(tmp_path):
    """Each trial's outcome comes from its JSON records, whatever Tune's results of this start hold: finished
    (or diverged), stopped early by ASHA (even where its Train run then ended in an error), failed, or never
    ended; its curve from ``history.json``."""
    from raypd.distributed.sweep import DIVERGED, _rows

    trials = {f"t0{i}": {"lr": 10.0 ** -i, "updates": 8, "distill.batch_size": 16} for i in range(5)}
    records = {
        "t00": {"final.json": {"update": 8, "heldout_loss": 0.5, "finished": 1, "fid": 3.0, "wall_seconds": 12.5},
                "history.json": {"2": 0.9, "4": 0.7, "8": 0.5}},
        "t01": {"final.json": {"update": 8, "heldout_loss": DIVERGED, "finished": 1}, "history.json": {"2": 1e31}},
        "t02": {"stopped.json": {"update": 4, "wall_seconds": 3.0}, "history.json": {"2": 2.0, "4": 1.5},
                "error.json": {"error": "ActorDiedError: the trial was stopped"}},
        "t03": {"error.json": {"error": "StageError: round 0: data error\nlast line"}, "history.json": {"2": 1.0}},
        "t04": {"history.json": {"2": 1.2}},
    }
    for name, files in records.items():
        (tmp_path / "trials" / name).mkdir(parents=True)
        for file, content in files.items():
            (tmp_path / "trials" / name / file).write_text(json.dumps(content))
    (tmp_path / "trials" / "t04" / "starts.log").write_text("1\n2\n")
    rows, curves = _rows(trials, [], str(tmp_path))
    by = {r["trial"]: r for r in rows}
    assert [by[t]["status"] for t in trials] == ["finished", "diverged", "stopped early", "failed", "stopped early"]
    assert by["t00"]["fid"] == 3.0 and by["t00"]["wall_seconds"] == 12.5 and curves["t00"] == [(2, 0.9), (4, 0.7),
                                                                                               (8, 0.5)]
    assert by["t02"]["updates_done"] == 4 and by["t02"]["heldout_loss"] == 1.5 and by["t02"]["error"] is None
    assert by["t03"]["error"] == "last line" and by["t04"]["starts"] == 2
    assert by["t01"]["distill.batch_size"] == 16 and by["t04"]["lr"] == 1e-4
