"""The training loop in one process (``dist.workers=0``): checkpoints inside a stage, resume, roll-back."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from raypd.config import load_config
from raypd.data.batch import Batch
from raypd.data.prepare import training_shards
from raypd.methods import objective_for
from raypd.train.runner import InProcessRunner
from raypd.train.stage import Stage, teacher_stage
from raypd.train.stage_loop import StageLoop

TINY = ["data.resolution=8", "model.attn_resolutions=[4]", "model.ch=32", "model.ch_mult=[1,2]",
        "teacher.batch_size=8", "teacher.warmup_updates=2", "data.loader_workers=0", "run.device=cpu",
        "dist.checkpoint_every=4", "dist.nonfinite_patience=2"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("loop")
    cfg = load_config(None, TINY)
    return cfg, training_shards(cfg.data, root / "data", seed=cfg.run.seed)


def _run(cfg, root, stage: Stage):
    InProcessRunner(cfg, root / "local", torch.device("cpu"),
                    objectives=lambda stage: objective_for(cfg, stage)).run(stage, root / "out")
    return load_file(str(root / "out" / "model.safetensors")), json.loads((root / "out" / "meta.json").read_text())


def interrupted_at(monkeypatch, update: int, run) -> None:
    """``run()`` with the stage loop interrupted as it reaches ``update``, the loop restored after."""
    original = StageLoop._update

    def killed(self, k, batches):
        if k == update:
            raise KeyboardInterrupt("interrupted")
        return original(self, k, batches)

    with monkeypatch.context() as patch:
        patch.setattr(StageLoop, "_update", killed)
        with pytest.raises(KeyboardInterrupt):
            run()


def test_an_interrupted_stage_resumes_at_its_checkpoint_and_ends_where_an_uninterrupted_one_does(
        setup, tmp_path, monkeypatch, capsys):
    cfg, shards = setup
    stage = teacher_stage(8, 4, shards)
    through, _ = _run(cfg, tmp_path / "through", stage)

    interrupted_at(monkeypatch, 6, lambda: _run(cfg, tmp_path / "again", stage))
    assert sorted(p.name for p in (tmp_path / "again" / "local" / "teacher").glob("checkpoint_*")) == \
        ["checkpoint_00000004"]
    resumed, meta = _run(cfg, tmp_path / "again", stage)
    assert "resumed from the checkpoint at update 4 of 8" in capsys.readouterr().err
    assert sorted(resumed) == sorted(through)
    assert all(torch.equal(resumed[k], through[k]) for k in through)  # the EMA, bit for bit
    assert meta["metrics"]["updates"] == 8 and meta["kind"] == "teacher"


def test_a_non_finite_streak_rolls_back_to_the_checkpoint_with_a_lower_learning_rate(setup, tmp_path, monkeypatch,
                                                                                       capsys):
    cfg, shards = setup
    original, poisoned = StageLoop.batches, []

    def nan_after_update_4(self, start):
        stream = original(self, start)
        if start != 4 or poisoned:
            return stream
        poisoned.append(start)
        return (Batch(torch.full_like(b.x, float("nan")), b.y) if i < 2 else b for i, b in enumerate(stream))

    monkeypatch.setattr(StageLoop, "batches", nan_after_update_4)
    weights, meta = _run(cfg, tmp_path, teacher_stage(8, 4, shards))
    assert "2 non-finite updates in a row: rolled back to update 4" in capsys.readouterr().err
    assert meta["metrics"]["lr"] == pytest.approx(cfg.teacher.lr * cfg.dist.rollback_lr_factor)
    assert meta["metrics"]["skipped_updates"] == 2
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_plain_engine_state_round_trips_without_pickles(setup, tmp_path):
    from raypd.train.engine import plain_engine
    from raypd.train.objective import TeacherTraining

    cfg, shards = setup

    def fresh():
        setup = TeacherTraining(cfg).setup(torch.device("cpu"))
        return plain_engine(setup.roles["teacher"], setup.batch_size)

    first = fresh()
    first.model(torch.randn(2, 1, 8, 8), torch.zeros(2)).square().mean().backward()
    first.step()
    first.save(tmp_path, {"updates": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engine.json", "engine.safetensors"]
    second = fresh()
    assert second.load(tmp_path) == {"updates": 1}
    a, b = first.optimizer.state_dict(), second.optimizer.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for i, state in a["state"].items():
        assert all(torch.equal(torch.as_tensor(v), torch.as_tensor(b["state"][i][k])) for k, v in state.items())
    assert all(torch.equal(first.ema.state_dict()[k], v) for k, v in second.ema.state_dict().items())
    assert second.updates == 1


def test_a_stage_is_typed_and_travels_as_plain_data(setup):
    _, shards = setup
    stage = teacher_stage(3, 4, shards)
    assert Stage.from_dict(json.loads(json.dumps(stage.to_dict()))) == stage
    with pytest.raises(ValueError, match="kind must be one of"):
        Stage("distill", "x", updates=1, stream=0, sampling_steps=1)
    with pytest.raises(ValueError, match="needs its teacher"):
        Stage("round", "round-00", updates=1, stream=1, sampling_steps=1)
    with pytest.raises(ValueError, match="unknown stage fields"):
        Stage.from_dict({**stage.to_dict(), "spec": 1})


def test_the_errors_that_cross_processes_unpickle_whole():
    import pickle

    from raypd.config import ConfigError
    from raypd.train.failures import NumericalError, StageError, StageFailure

    for err in (ConfigError("dist.precision", "bad"), StageFailure("data", "round 0: broken shard"),
                StageError("stage round-00 failed", "settings"), NumericalError("diverged")):
        back = pickle.loads(pickle.dumps(err))
        assert type(back) is type(err) and str(back) == str(err) and vars(back) == vars(err)
