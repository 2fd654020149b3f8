"""A recorded loss curve: the local config's first teacher updates and first distillation updates.

Data, noise, model, loss, optimizer and the training loop all feed it, so a change to any numerics
shows here. A change made on purpose rewrites ``tests/golden/local_curve.json`` with
RAYPD_UPDATE_GOLDEN=1 (and says why). CPU kernels differ slightly between processors, hence a
relative tolerance rather than equality.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "local_curve.json"
UPDATES = 6


def curve(tmp: Path) -> dict[str, list[float]]:
    from raypd.config import load_config
    from raypd.data.prepare import training_shards
    from raypd.methods import method_for
    from raypd.methods import objective_for
    from raypd.train.engine import plain_engine
    from raypd.train.stage import round_stage, teacher_stage
    from raypd.train.stage_loop import StageLoop
    from raypd.train.store import DirectoryStore

    torch.set_num_threads(1)
    cfg = load_config(None, ["run.log_every=1", "run.device=cpu", "data.loader_workers=0", "dist.checkpoint_every=4"])
    shards = training_shards(cfg.data, tmp / "data", seed=cfg.run.seed)

    def losses(stage) -> tuple[list[float], Path]:
        store = DirectoryStore(tmp / stage.name, keep=2)
        loop = StageLoop(cfg, stage, objective=objective_for(cfg, stage), build_engine=plain_engine, store=store,
                         staging=store.staging, device=torch.device("cpu"))
        loop.run(loop.resume())
        return [loop.losses[k] for k in sorted(loop.losses)], store.final() / "consolidated"

    teacher, path = losses(teacher_stage(UPDATES, cfg.teacher.sampling_steps, shards))
    rnd = dataclasses.replace(method_for(cfg).plan()[0], updates=UPDATES)
    round0, _ = losses(round_stage(rnd, path, shards))
    return {"teacher": teacher, "round0": round0}


def test_local_loss_curve_matches_the_recording(tmp_path):
    now = curve(tmp_path)
    if os.environ.get("RAYPD_UPDATE_GOLDEN") == "1":
        GOLDEN.write_text(json.dumps(now, indent=1) + "\n")
    golden = json.loads(GOLDEN.read_text())
    assert set(now) == set(golden)
    for key in golden:
        assert now[key] == pytest.approx(golden[key], rel=2e-4), key
