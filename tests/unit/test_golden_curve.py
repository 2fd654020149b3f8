"""A recorded loss curve: the local config's first teacher updates and first distillation updates.

Data, noise, model, loss and optimizer all feed it, so a change to any numerics shows here. A change
made on purpose rewrites ``tests/golden/local_curve.json`` with RAYPD_UPDATE_GOLDEN=1 (and says why).
CPU kernels differ slightly between processors, hence a relative tolerance rather than equality.
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
    from raypd.models import build_denoiser
    from raypd.pipeline import Context, distill_round
    from raypd.train import build_plain_engine, freeze, plan_rounds, warmup
    from raypd.train.loop import run_updates

    torch.set_num_threads(1)
    cfg = load_config(None, ["run.log_every=1", "run.device=cpu", "data.loader_workers=0"])
    ctx = Context(cfg, tmp, torch.device("cpu"), training_shards(cfg.data, tmp / "data", seed=cfg.run.seed))
    t = cfg.teacher
    torch.manual_seed(cfg.run.seed)  # as the pipeline's teacher training does
    engine = build_plain_engine(build_denoiser(cfg.model, cfg.data).train(), lr=t.lr, betas=t.adam_betas,
                                grad_clip=t.grad_clip, schedule=warmup(t.warmup_updates), ema_decay=t.ema_decay)
    taught = run_updates(engine, iter(ctx.batches(t.batch_size, stream=0)), UPDATES, label="teacher", log_every=1,
                         device="cpu", step_kwargs=ctx.step_kwargs(seed=cfg.run.seed), print_fn=lambda line: None)
    rnd = dataclasses.replace(plan_rounds(cfg.distill)[0], updates=UPDATES)
    _, stats = distill_round(ctx, freeze(engine.model), rnd)
    return {"teacher": [loss for _, loss in taught.losses], "round0": [loss for _, loss in stats["losses"]]}


def test_local_loss_curve_matches_the_recording(tmp_path):
    now = curve(tmp_path)
    if os.environ.get("RAYPD_UPDATE_GOLDEN") == "1":
        GOLDEN.write_text(json.dumps(now, indent=1) + "\n")
    golden = json.loads(GOLDEN.read_text())
    assert set(now) == set(golden)
    for key in golden:
        assert now[key] == pytest.approx(golden[key], rel=2e-4), key
