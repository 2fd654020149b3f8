"""The settings matrix, run for real: ZeRO stage x precision x offload, on 2 Ray Train workers (and a combination
per stage, precision, offload kind and stage kind on 1).

One Ray session and one Ray Train run per worker count (a Ray Train start costs ~15 s here); inside,
every combination goes through the production loop (``StageLoop`` on the DeepSpeed engine) with gloo:
a round starts from the teacher's exact fp32 weights and trains with finite losses and no update
counted as skipped; teacher training moves one EMA, kept on rank 0 alone, and hands it on; the
student a round hands on equals
DeepSpeed's own zero-to-fp32 consolidation of the same checkpoint and is fp32; a fresh engine resumed
from the mid-stage checkpoint runs the next updates with the same losses; NaN data on rank 1 alone
rolls every rank back to the last checkpoint with half the learning rate, and the stage then finishes. TRACT
phases keep the same self-teacher on every rank, averaged from whole weights, and resume it from the checkpoint;
a Denoising Student's stage trains on (noise, sample) pair shards the same way; guided distillation's first stage
trains a w-conditioned student on a guided teacher's combined prediction, and its teacher trains with label dropout.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from raypd.train.stage import Stage  # noqa: E402
from tests.matrix_worker import EVERY, UPDATES  # noqa: E402
from tests.teachers import perturbed_denoiser  # noqa: E402

LR = 1e-3
TRACT = ["distill.method=tract", "distill.tract.phases=[8,1]"]
# the student and its adaptive weighting, two roles; the tangent through a JVP or a finite difference
SCD = ["distill.method=scd", "distill.scd.warmup_updates=2"]
# two segments, the teacher's grid doubling from 4 to 8 steps halfway, an EMA target network
CONSISTENCY = ["distill.method=consistency", "distill.consistency.segments=2", "distill.end_steps=2",
               "distill.start_steps=8", "distill.consistency.initial_steps=4", "distill.consistency.target_ema=0.9"]
CRITIC = ["distill.method=critic_test", "distill.critic_test.every=2", f"distill.critic_test.lr={LR}"]
GUIDED = ["data.num_classes=10", "model.class_dropout=0.5", "distill.guidance_max=2", f"distill.guidance_lr={LR}",
          "distill.guidance_embedding_lr_factor=4"]
COMBOS = [(f"z{stage}-{precision}-{offload}", [f"dist.zero_stage={stage}", f"dist.precision={precision}",
                                                f"dist.offload_optimizer={str(offload in ('opt', 'params')).lower()}",
                                                f"dist.offload_params={str(offload == 'params').lower()}",
                                                f"dist.teacher_dtype={precision}"])
          for stage in (0, 1, 2, 3) for precision in ("fp32", "bf16")
          for offload in (("none",) if stage == 0 else ("none", "opt") if stage < 3 else ("none", "opt", "params"))] + [
    # communication and memory settings (the combos above run the defaults: overlapped 50M-element buckets)
    ("z2-fp32-serial-comm", ["dist.zero_stage=2", "dist.precision=fp32", "dist.overlap_comm=false",
                             "dist.bucket_elements=1000000"]),
    ("z3-bf16-grad-ckpt", ["dist.zero_stage=3", "dist.precision=bf16", "dist.teacher_dtype=bf16",
                           "dist.gradient_checkpointing=true"]),
    # TRACT: the self-teacher is averaged from whole weights on every rank and checkpointed
    ("z3-bf16-tract", ["dist.zero_stage=3", "dist.precision=bf16", "dist.teacher_dtype=bf16", *TRACT]),
    ("z1-fp32-tract", ["dist.zero_stage=1", "dist.precision=fp32", *TRACT]),
    # consistency: the target network is an average of the student under ZeRO, checkpointed; the curriculum's grid
    # follows the update count through the resume
    ("z3-bf16-consistency", ["dist.zero_stage=3", "dist.precision=bf16", "dist.teacher_dtype=bf16", *CONSISTENCY]),
    ("z0-fp32-consistency", ["dist.zero_stage=0", "dist.precision=fp32", *CONSISTENCY]),
    ("z2-bf16-opt-consistency", ["dist.zero_stage=2", "dist.precision=bf16", "dist.offload_optimizer=true",
                                 *CONSISTENCY[:-1], "distill.consistency.target_ema=0"]),
    # sCD: the JVP through the target network (an average of the student) beside ZeRO-partitioned roles
    ("z3-bf16-scd", ["dist.zero_stage=3", "dist.precision=bf16", "dist.teacher_dtype=bf16", *SCD]),
    ("z1-fp32-scd-fd", ["dist.zero_stage=1", "dist.precision=fp32", *SCD, "distill.scd.tangent=finite_difference"]),
    # the Denoising Student: batches of (noise, teacher sample) pairs from shards
    ("z2-bf16-denoising-student", ["dist.zero_stage=2", "dist.precision=bf16", "distill.method=denoising_student"]),
    # guided distillation's first stage: a w-conditioned student (its w embedding partitioned like the rest)
    ("z3-bf16-guided", ["dist.zero_stage=3", "dist.precision=bf16", "dist.teacher_dtype=bf16", *GUIDED]),
    # ... and under ZeRO-2 with the optimizer offloaded (the ImageNet 64 guided config's stage, plus offload):
    # its two parameter groups, each at its own rate, go through DeepSpeed's offloaded optimizer
    ("z2-bf16-opt-guided", ["dist.zero_stage=2", "dist.precision=bf16", "dist.teacher_dtype=bf16",
                            "dist.offload_optimizer=true", *GUIDED]),
    # two roles (tests/two_role.py): a student stepping every second update and a critic at every one, each its
    # own DeepSpeed engine under the stage's ZeRO stage, precision and offload (or a precision of its own)
    ("z0-fp32-critic", ["dist.zero_stage=0", "dist.precision=fp32", *CRITIC]),
    ("z1-bf16-opt-critic", ["dist.zero_stage=1", "dist.precision=bf16", "dist.teacher_dtype=bf16",
                            "dist.offload_optimizer=true", *CRITIC]),
    ("z2-fp32-critic", ["dist.zero_stage=2", "dist.precision=fp32", *CRITIC]),
    ("z2-bf16-critic-fp32", ["dist.zero_stage=2", "dist.precision=bf16", *CRITIC,
                             "distill.critic_test.precision=fp32"]),
    ("z3-bf16-critic", ["dist.zero_stage=3", "dist.precision=bf16", "dist.teacher_dtype=bf16", *CRITIC]),
    ("z3-fp32-params-critic", ["dist.zero_stage=3", "dist.precision=fp32", "dist.offload_optimizer=true",
                               "dist.offload_params=true", *CRITIC]),
]
# one worker runs a combination per ZeRO stage, precision and offload kind, plus each stage kind: what a single rank
# does differently (no partner to partition with, no cross-rank agreement) shows there; two workers run them all
ONE_WORKER = ["z0-fp32-none", "z1-bf16-opt", "z2-fp32-none", "z3-bf16-params", "z3-bf16-tract",
              "z3-bf16-consistency", "z3-bf16-scd",
              "z2-bf16-denoising-student", "z3-bf16-guided", "z0-fp32-critic", "z3-fp32-params-critic"]
BASE = ["data.resolution=8", "model.attn_resolutions=[4]", "model.ch=32", "data.loader_workers=0",
        "distill.batch_size=8", "teacher.batch_size=8", "teacher.warmup_updates=1", f"distill.lr={LR}", f"dist.checkpoint_every={EVERY}", "dist.nonfinite_patience=2",
        "dist.max_rollbacks=1", "data.shuffle_buffer=16", "dist.workers=2"]  # the worker count is the Ray run's


@pytest.fixture(scope="module")
def ray_session():
    import ray

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(num_cpus=4, include_dashboard=False, configure_logging=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def stage_inputs(tmp_path_factory):
    import torch

    from raypd.checkpoint import meta_for, save_checkpoint, weights_digest
    from raypd.config import load_config
    from raypd.data.prepare import training_shards
    from raypd.pairs import ensure_pairs
    from raypd.train.rounds import make_student

    root = tmp_path_factory.mktemp("matrix")
    cfg = load_config(None, BASE)
    teacher = perturbed_denoiser(cfg)
    save_checkpoint(root / "teacher", teacher, meta_for(cfg, kind="teacher", sampling_steps=4, round=None))
    shards = training_shards(cfg.data, root / "data", readers=2)
    spec = Stage("round", "round-00", teacher=str(root / "teacher"), round=0, updates=UPDATES, student_steps=2,
                 sampling_steps=2, stream=1, shards=shards).to_dict()
    pairs = ensure_pairs(load_config(None, [*BASE, "distill.method=denoising_student", "distill.start_steps=4"]),
                         root, teacher.eval(), weights_digest(root / "teacher"), count=32, device=torch.device("cpu"))
    guided_cfg = load_config(None, [*BASE, *GUIDED])
    guided = perturbed_denoiser(guided_cfg)
    save_checkpoint(root / "teacher-guided", guided, meta_for(guided_cfg, kind="teacher", sampling_steps=4, round=None))
    numel = {"plain": sum(p.numel() for p in teacher.parameters()),
             "guided": sum(p.numel() for p in make_student(guided, guidance_input=True).parameters())}
    return cfg.to_dict(), spec, root, numel, pairs


def _combos(workers: int) -> list[tuple[str, list[str]]]:
    chosen = COMBOS if workers > 1 else [(name, overrides) for name, overrides in COMBOS if name in ONE_WORKER]
    only = os.environ.get("RAYPD_MATRIX_ONLY")  # a developer's shortcut: rerun some combinations by name
    return [c for c in chosen if c[0] in only.split(",")] if only else chosen


def _run_matrix(workers: int, stage_inputs) -> list[dict]:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from tests.matrix_worker import matrix_worker

    base, spec, root, _, pairs = stage_inputs
    trainer = TorchTrainer(matrix_worker,
                           train_loop_config={"combos": _combos(workers), "base": base, "spec": spec, "root": str(root),
                                              "pairs": pairs, "guided_teacher": str(root / "teacher-guided")},
                           scaling_config=ScalingConfig(num_workers=workers),
                           torch_config=TorchConfig(backend="gloo", timeout_s=120),
                           run_config=RunConfig(name=f"matrix-{workers}w", storage_path=str(root / "ray")))
    return trainer.fit().return_value


def _check(results: list[dict], workers: int, numels: dict) -> list[str]:
    rows = []
    assert [r["name"] for r in results] == [name for name, _ in _combos(workers)]
    failed = {r["name"]: r["ranks"][i]["traceback"] for r in results for i in range(workers) if "error" in r["ranks"][i]}
    assert not failed, "\n\n".join(f"{name}:\n{tb}" for name, tb in failed.items())
    for result in results:
        name, ranks = result["name"], result["ranks"]
        numel = numels["guided" if "guided" in name else "plain"]
        errors = [r["error"] for r in ranks if "error" in r]
        assert not errors, f"{workers} worker(s), {name}: {errors}"
        critic = "critic" in name
        for rank, r in enumerate(ranks):
            if critic:
                _check_roles(name, rank, r)
                continue
            losses = [r["losses"][k] for k in range(1, UPDATES + 1)]
            assert all(math.isfinite(x) for x in losses), (name, rank, losses)
            assert r["skipped"] == 0, f"{name}: {r['skipped']} updates counted as skipped on rank {rank}"
            assert r["start_max_diff"] == 0.0, (name, rank, r["start_max_diff"])
            # the resumed engine continues at the checkpoint's update with the uninterrupted run's losses: the
            # same weights, Adam moments, data window and per-update seeds; CPU kernels and gloo sums run in the
            # same order, so equal to fp32 rounding (1e-5 relative leaves room for a reordered reduction)
            assert r["resumed_at"] == EVERY
            for k in range(EVERY + 1, UPDATES + 1):
                assert r["resumed_losses"][k] == pytest.approx(r["losses"][k], rel=1e-5, abs=1e-7), (name, rank, k)
                for role, losses in r["role_losses"].items():  # every role resumes (sCD's weighting beside it)
                    assert r["resumed_role_losses"][role][k] == pytest.approx(losses[k], rel=1e-5, abs=1e-7), (
                        name, rank, role, k)
            rb = r["rollback"]
            assert rb["rollbacks"] == 1 and rb["skipped"] == 2, (name, rank, rb)
            assert rb["base_lr"] == pytest.approx(LR * 0.5), (name, rank, rb)
            after = [rb["losses"][k] for k in range(EVERY + 1, UPDATES + EVERY + 1)]
            assert all(math.isfinite(x) for x in after), (name, rank, after)
            t = r["teacher"]
            assert all(math.isfinite(x) for x in t["losses"].values()) and t["skipped"] == 0, (name, rank, t)
            assert t["has_ema"] == (rank == 0), (name, rank)  # one EMA, on rank 0: no copy on the others
        if critic:
            c = ranks[0]["critic"]
            own = "fp32" if "critic-fp32" in name else "bf16" if "bf16" in name else "fp32"
            assert (c["precision"], c["student_precision"]) == (own, "bf16" if "bf16" in name else "fp32"), name
            assert c["moved"] > 0 and c["dtypes"] == ["torch.float32"] and c["numel"] == numel, (name, c)
            if "z0" not in name:
                assert c["keys"] and c["max_diff"] == 0.0, (name, c)
        assert ranks[0]["teacher"]["ema_moved"] > 0, name
        assert ranks[0]["teacher"]["saved_is_ema"], name
        if workers > 1:  # the ranks read different data: their losses differ
            first = min(ranks[0]["losses"])
            assert ranks[0]["losses"][first] != ranks[1]["losses"][first], name
        kept = "self_teacher" if "tract" in name else "target" if "consistency" in name or "scd" in name else None
        if kept:  # the resumed losses above also need the average back from the checkpoint
            averages = [r["averages"][kept] for r in ranks]
            assert all(a == averages[0] for a in averages), (name, averages)
            assert averages[0]["updates"] == UPDATES and averages[0]["moved"] > 0, (name, averages[0])
        else:
            assert all(not r["averages"] for r in ranks), name
        if "guided" in name:  # the w embedding learned, and the teacher's labels were dropped to 'no class'
            assert ranks[0]["guidance_moved"] > 0 and sum(r["teacher"]["dropped_labels"] for r in ranks) > 0, name
            # the w embedding trains in a group of its own at 4x the network's rate, also once resumed
            for r in ranks:
                network, embedding = r["group_lrs"]
                assert network == pytest.approx(LR * (1 - EVERY / UPDATES)) and embedding == pytest.approx(4 * network)
        else:
            assert all(len(r["group_lrs"]) == 1 for r in ranks), name
        if workers > 1 and critic:  # every rank holds the same (replicated or gathered) roles
            assert all(r["critic"]["updates"] == UPDATES for r in ranks), name
        r0 = ranks[0]
        assert r0["consolidated_keys"] and r0["consolidated_numel"] == numel, name
        assert r0["consolidated_dtypes"] == ["torch.float32"], name
        assert r0["consolidated_max_diff"] == 0.0, (name, r0["consolidated_max_diff"])
        assert r0.get("master_has_more_bits", True), name
        rows.append(f"{workers} | {name} | pass | {r0['seconds']:.1f}")
    return rows


def _check_roles(name: str, rank: int, r: dict) -> None:
    """A two-role stage: the critic steps at every update, the student at every second; both resume with the same
    next losses; non-finite data rolls both back, each at half its rate."""
    roles = r["role_losses"]
    assert sorted(roles["critic"]) == list(range(1, UPDATES + 1)), (name, rank, roles)
    assert sorted(roles["student"]) == list(range(2, UPDATES + 1, 2)) == sorted(r["losses"]), (name, rank, roles)
    assert all(math.isfinite(x) for role in roles.values() for x in role.values()), (name, rank, roles)
    assert r["skipped"] == 0 and r["critic"]["skipped"] == 0 and r["start_max_diff"] == 0.0, (name, rank)
    assert r["resumed_at"] == EVERY
    for role, losses in r["resumed_role_losses"].items():
        for k, value in losses.items():
            assert value == pytest.approx(roles[role][k], rel=1e-5, abs=1e-7), (name, rank, role, k)
    rb = r["rollback"]
    # NaN data at updates 3 and 4: the critic skips both, the student its one (4); then both go back to update 2
    assert rb["rollbacks"] == 1 and rb["roles"]["critic"]["skipped"] == 2 and rb["roles"]["student"]["skipped"] == 1
    assert rb["roles"]["student"]["base_lr"] == pytest.approx(LR * 0.5) == rb["roles"]["critic"]["base_lr"]


@pytest.mark.parametrize("workers", [1, 2])
def test_every_deepspeed_setting_trains_hands_on_fp32_resumes_and_rolls_back(ray_session, stage_inputs, workers):
    results = _run_matrix(workers, stage_inputs)
    rows = _check(results, workers, stage_inputs[3])
    print("\nworkers | setting | passes | seconds\n" + "\n".join(rows))
