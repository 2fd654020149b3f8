"""The loss curves and final weights of each built-in method's stage on fixed seeds, in process and on one Ray Train
worker (DeepSpeed): recorded once in ``tests/golden/method_curves.json``, compared by ``test_method_curves``.

Every stage starts from the same small perturbed teacher and reads the same shards; a method's numerics (targets,
times, self-teacher, pairs, guidance weights) all feed the losses and the weights' digest.
"""

from __future__ import annotations

import hashlib
import platform
from pathlib import Path

import torch

from tests.teachers import perturbed_denoiser

UPDATES, EVERY = 8, 4
BASE = ["data.resolution=8", "model.attn_resolutions=[4]", "model.ch=32", "model.ch_mult=[1,2]",
        "distill.batch_size=8", "teacher.batch_size=8", "data.loader_workers=0", "run.device=cpu",
        f"dist.checkpoint_every={EVERY}", "data.num_classes=10", "model.class_dropout=0.25", "distill.lr=1e-3"]
METHODS = {
    "progressive": [],
    "tract": ["distill.method=tract", "distill.tract.phases=[8,1]"],
    "denoising_student": ["distill.method=denoising_student", "distill.start_steps=4",
                          "distill.denoising_student.pairs=32"],
    "guided": ["distill.guidance_max=2", "distill.guidance_lr=1e-3"],
}
STEPS = {"progressive": (4, 2), "tract": (4, 1), "denoising_student": (4, 1), "guided": (4, 4)}
"""(teacher steps, student steps) of each method's stage."""


def fingerprint() -> str:
    """What decides the bits of a CPU run: the processor and torch's build."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return f"{cpu} | torch {torch.__version__}"


def digest(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def inputs(root: Path) -> dict:
    """The teacher checkpoint, the shards and the pairs every method's stage reads."""
    from raypd.checkpoint import meta_for, save_checkpoint, weights_digest
    from raypd.config import load_config
    from raypd.data.prepare import training_shards
    from raypd.pairs import ensure_pairs

    cfg = load_config(None, BASE)
    teacher = perturbed_denoiser(cfg)
    save_checkpoint(root / "teacher", teacher, meta_for(cfg, kind="teacher", sampling_steps=4, round=None))
    shards = training_shards(cfg.data, root / "data", seed=cfg.run.seed)
    pairs = ensure_pairs(load_config(None, [*BASE, *METHODS["denoising_student"]]), root, teacher.eval(),
                         weights_digest(root / "teacher"), count=32, device=torch.device("cpu"))
    return {"teacher": str(root / "teacher"), "shards": shards, "pairs": pairs}


def stage_for(method: str, made: dict):
    from raypd.train.stage import Stage

    teacher_steps, student_steps = STEPS[method]
    return Stage("round", f"round-{method}", updates=UPDATES, stream=1, sampling_steps=student_steps,
                 shards=tuple(made["pairs" if method == "denoising_student" else "shards"]), round=0,
                 teacher=made["teacher"], student_steps=student_steps, teacher_steps=teacher_steps,
                 phase="guidance" if method == "guided" else "")


def in_process(method: str, made: dict, root: Path) -> dict:
    """Every update's loss and the consolidated student's digest, through the in-process loop."""
    from raypd.config import load_config
    from raypd.methods import objective_for
    from raypd.train.engine import plain_engine
    from raypd.train.stage_loop import StageLoop
    from raypd.train.store import DirectoryStore
    from safetensors.torch import load_file

    torch.set_num_threads(1)
    cfg = load_config(None, [*BASE, *METHODS[method]])
    store = DirectoryStore(root / f"local-{method}", keep=2)
    stage = stage_for(method, made)
    loop = StageLoop(cfg, stage, objective=objective_for(cfg, stage), build_engine=plain_engine, store=store,
                     staging=store.staging, device=torch.device("cpu"))
    loop.run(loop.resume())
    weights = load_file(str(store.final() / "consolidated" / "model.safetensors"))
    return {"losses": [loop.losses[k] for k in sorted(loop.losses)], "digest": digest(weights)}


def on_ray(method: str, made: dict, root: Path) -> dict:
    """The final loss and the consolidated student's digest of the stage as a one-worker Ray Train run."""
    from raypd.config import load_config
    from raypd.distributed.trainer import RayTrainRunner
    from safetensors.torch import load_file

    cfg = load_config(None, [*BASE, *METHODS[method], "dist.workers=1"])
    out = root / f"ray-out-{method}"
    metrics = RayTrainRunner(cfg, root / "ray").run(stage_for(method, made), out)
    return {"final_loss": metrics["final_loss"], "digest": digest(load_file(str(out / "model.safetensors")))}
