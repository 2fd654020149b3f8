"""Run inside Ray Train workers by the settings-matrix test: every DeepSpeed setting through the stage code.

For each combination this rank: trains a short round (``StageLoop.run``, checkpoints merged into a shared
folder the way Ray Train merges the ranks' files), checks the consolidated student against DeepSpeed's own
zero-to-fp32 consolidation of the same checkpoint, resumes a fresh engine from the mid-stage checkpoint
and runs the same updates again, and rolls back from NaN data fed to rank 1 only. Returns the figures
(rank 0 gathers every rank's); the test asserts on them.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as torch_dist

from raypd.data.batch import Batch

UPDATES, EVERY = 4, 2


class SharedFolderStore:
    """Ray Train's checkpoint merge on one machine: every rank copies its files into one folder per report."""

    def __init__(self, root: Path):
        self.root, self.reported = root, []

    def report(self, metrics: dict, path: str, final: bool = False) -> None:
        dest = self.root / f"checkpoint_{metrics['update']:06d}"
        shutil.copytree(path, dest, dirs_exist_ok=True)
        shutil.rmtree(path, ignore_errors=True)
        torch_dist.barrier()
        self.reported.append(dest)

    @contextlib.contextmanager
    def latest(self):
        yield str(self.reported[-1]) if self.reported else None


def _poison_last_rank(run, rank: int, world: int) -> None:
    """NaN images on the last rank (rank 1 of 2) for the two updates after update 2, once: a non-finite streak
    that starts on one rank only."""
    original, done = run.batches, []

    def batches(start: int):
        stream = original(start)
        if rank != world - 1 or start != EVERY or done:
            return stream
        done.append(True)

        def poisoned():
            for i, b in enumerate(stream):
                yield Batch(torch.full_like(b.x, float("nan")), b.y, b.z) if i < 2 else b
        return poisoned()

    run.batches = batches


def _loop(cfg, stage, rank: int, world: int, store, staging: Path):
    """The production loop on the production DeepSpeed engine, as a Ray Train worker builds it."""
    from raypd.distributed.deepspeed import stage_engine
    from raypd.distributed.guards import agree, dist_settings
    from raypd.methods import objective_for
    from raypd.train.stage_loop import StageLoop

    device = torch.device("cpu")
    return StageLoop(cfg, stage, objective=objective_for(cfg, stage), build_engine=stage_engine(cfg, world),
                     store=store, staging=staging, device=device,
                     rank=rank, world=world, settings=dist_settings(cfg, world),
                     agree=lambda error: agree(error, world=world, label=stage.label, device=device))


def _combo(cfg, spec: dict, root: Path, rank: int, world: int, pairs: list[str], guided_teacher: str) -> dict:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    from raypd.distributed.deepspeed import TAG
    from raypd.train.stage import Stage

    stage = Stage.from_dict(spec)
    if cfg.distill.method == "tract":  # one phase of 4 teacher steps into 1: the self-teacher takes 3 of them
        stage = stage.with_(student_steps=1, sampling_steps=1, teacher_steps=4)
    elif cfg.distill.method == "scd":  # one step, in continuous time (the teacher's steps are nominal)
        stage = stage.with_(student_steps=1, sampling_steps=1, teacher_steps=4)
    elif cfg.distill.method == "consistency":  # 2 segments of a teacher grid doubling from 4 to 8 steps
        stage = stage.with_(student_steps=2, sampling_steps=2, teacher_steps=8)
    elif cfg.distill.method == "denoising_student":  # one step, trained on the teacher's pairs
        stage = stage.with_(student_steps=1, sampling_steps=1, teacher_steps=4, shards=tuple(pairs))
    elif cfg.distill.guided:  # the first stage: a w-conditioned student of the guided teacher, at its 4 steps
        stage = stage.with_(teacher=guided_teacher, phase="guidance", student_steps=4, sampling_steps=4,
                            teacher_steps=4)
    began = time.perf_counter()
    store = SharedFolderStore(root / "through")
    run = _loop(cfg, stage, rank, world, store, root / f"staging{rank}")
    teacher = run.teacher.state_dict()
    start = run.engine.master_state_dict()  # the student starts from the teacher's exact fp32 weights
    out_start = max(float((start[k] - teacher[k].float()).abs().max()) for k in teacher)
    run.run(0)
    out = {"losses": run.losses, "skipped": run.engine.skipped_updates, "lr_after": run.engine.base_lr,
           "start_max_diff": out_start, "role_losses": run.role_losses}
    final = store.reported[-1]
    out["averages"] = {}
    for name, kept in run.averages.items():  # every rank keeps the same average, and it moved off the start
        average = kept.state_dict()
        out["averages"][name] = {"sum": float(sum(v.double().sum() for v in average.values())),
                                 "moved": max(float((average[k] - teacher[k].float()).abs().max()) for k in teacher),
                                 "updates": kept.count}
    if "critic" in run.engines:
        out["critic"] = _critic(run, final, rank, teacher)
    if rank == 0:
        mine = load_file(str(final / "consolidated" / "model.safetensors"))
        if cfg.distill.guided:
            out["guidance_moved"] = max(float(v.abs().max()) for k, v in mine.items()
                                        if "class_embedding.guidance.2." in k)
        out["consolidated_dtypes"] = sorted({str(v.dtype) for v in mine.values()})
        out["consolidated_numel"] = sum(v.numel() for v in mine.values())
        if cfg.dist.zero_stage:
            ref = get_fp32_state_dict_from_zero_checkpoint(str(final), tag=TAG)
        else:
            # ZeRO-0 checkpoints are not ZeRO-partitioned: DeepSpeed saves the module itself (fp32: the master
            # weights; bf16: their bf16 copies, which the fp32 master must round to, while holding more bits)
            module = torch.load(final / TAG / "mp_rank_00_model_states.pt", weights_only=False)["module"]
            ref = {k: v for k, v in module.items()}
            if cfg.dist.precision == "bf16":
                out["master_has_more_bits"] = any(bool((mine[k] != mine[k].bfloat16().float()).any()) for k in ref)
                mine = {k: v.bfloat16() for k, v in mine.items()}
        out["consolidated_keys"] = sorted(mine) == sorted(ref)
        out["consolidated_max_diff"] = max(float((mine[k].float() - ref[k].float()).abs().max()) for k in ref)
    torch_dist.barrier()

    resumed = _loop(cfg, stage, rank, world, SharedFolderStore(root / "resumed"), root / f"staging{rank}")
    start = int(resumed.restore(store.root / f"checkpoint_{EVERY:06d}")["updates"])
    out["group_lrs"] = [float(g["lr"]) for g in resumed.engine.engine.optimizer.param_groups]
    resumed.run(start)
    out["resumed_at"], out["resumed_losses"] = start, resumed.losses
    out["resumed_role_losses"] = resumed.role_losses

    rolled = _loop(cfg, stage.with_(updates=UPDATES + EVERY), rank, world, SharedFolderStore(root / "rolled"),
                   root / f"staging{rank}")
    _poison_last_rank(rolled, rank, world)
    rolled.run(0)
    out["rollback"] = {"rollbacks": rolled.rollbacks, "skipped": rolled.engine.skipped_updates,
                       "base_lr": rolled.engine.base_lr, "losses": rolled.losses,
                       "roles": {name: {"skipped": e.skipped_updates, "base_lr": e.base_lr}
                                 for name, e in rolled.engines.items()}}

    # teacher training: the EMA of whole weights (gathered under ZeRO-3) is what the stage hands on
    t_stage = Stage("teacher", "teacher", updates=EVERY, sampling_steps=4, stream=0, shards=stage.shards)
    taught = _loop(cfg, t_stage, rank, world, SharedFolderStore(root / "teacher"), root / f"staging{rank}")
    dropped = _count_dropped_labels(taught, cfg)
    out["teacher"] = {"has_ema": taught.engine.ema is not None}  # rank 0 alone keeps the EMA
    initial = {k: v.clone() for k, v in taught.engine.ema.state_dict().items()} if rank == 0 else {}
    taught.run(0)
    out["teacher"].update(losses=taught.losses, skipped=taught.engine.skipped_updates, dropped_labels=sum(dropped))
    if rank == 0:
        ema = taught.engine.ema.state_dict()
        out["teacher"]["ema_moved"] = max(float((ema[k] - initial[k]).abs().max()) for k in ema)
        saved = load_file(str(taught.store.reported[-1] / "consolidated" / "model.safetensors"))
        out["teacher"]["saved_is_ema"] = all(torch.equal(saved[k], ema[k]) for k in ema)
    out["seconds"] = time.perf_counter() - began
    return out


def _critic(run, final: Path, rank: int, teacher: dict) -> dict:
    """The second role: it moved off its start (a copy of the teacher), and its consolidated weights are whole, fp32
    and equal DeepSpeed's own consolidation of its checkpoint."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    from raypd.distributed.deepspeed import TAG

    engine = run.engines["critic"]
    out = {"updates": engine.updates, "skipped": engine.skipped_updates, "precision": engine.precision,
           "student_precision": run.engine.precision}
    if rank != 0:
        return out
    mine = load_file(str(final / "roles" / "critic" / "consolidated.safetensors"))
    out["moved"] = max(float((mine[k] - teacher[k].float()).abs().max()) for k in teacher)
    out["dtypes"] = sorted({str(v.dtype) for v in mine.values()})
    out["numel"] = sum(v.numel() for v in mine.values())
    if engine.zero_stage:
        ref = get_fp32_state_dict_from_zero_checkpoint(str(final / "roles" / "critic"), tag=TAG)
        out["keys"] = sorted(mine) == sorted(ref)
        out["max_diff"] = max(float((mine[k].float() - ref[k].float()).abs().max()) for k in ref)
    return out


def _count_dropped_labels(run, cfg) -> list[int]:
    """Counts, per update, the labels that label dropout turned into the 'no class' label (none without it)."""
    from raypd.train import objective as step

    counts, original = [], step.drop_labels

    def counting(y, p, null_class, generator):
        out = original(y, p, null_class, generator)
        counts.append(int((out == null_class).sum()))
        return out

    step.drop_labels = counting  # this process runs one stage at a time
    original_run = run.run

    def run_then_restore(start=0):
        try:
            return original_run(start)
        finally:
            step.drop_labels = original
    run.run = run_then_restore
    return counts


def matrix_worker(config: dict) -> list | None:
    import deepspeed
    import ray.train

    import tests.two_role  # noqa: F401 - registers the two-role test method
    from raypd.config import config_from_dict

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    deepspeed.init_distributed(dist_backend="gloo")
    results = []
    for name, overrides in config["combos"]:
        cfg = config_from_dict(config["base"], overrides)
        root = Path(config["root"]) / f"{world}w-{name}"
        try:
            out = _combo(cfg, config["spec"], root, rank, world, config["pairs"], config["guided_teacher"])
        except Exception as err:  # noqa: BLE001 - reported to the test, which names the combination
            import traceback

            out = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-1500:]}
        gathered = [None] * world
        torch_dist.all_gather_object(gathered, out)
        results.append({"name": name, "ranks": gathered})
        if rank == 0 and "error" not in out:
            shutil.rmtree(root, ignore_errors=True)
    return results if rank == 0 else None
