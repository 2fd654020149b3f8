"""Stages that train more than one network: a test method's student and critic (``tests/two_role.py``) in one process.

Each role has its own optimizer, rate and update ratio; a role's loss never moves another role's weights; both
roles and their update counts are checkpointed, resume bit for bit and roll back together; both are consolidated;
the progress lines and metrics name each role. The registry and the method sections are checked too.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from raypd.checkpoint import meta_for, save_checkpoint
from raypd.config import ConfigError, load_config
from raypd.data.batch import Batch
from raypd.data.prepare import training_shards
from raypd.methods import METHODS, Method, method_for, objective_for, register
from raypd.train.engine import plain_engine
from raypd.train.objective import Average, Role, StageSetup
from raypd.train.runner import InProcessRunner
from raypd.train.stage import Stage
from raypd.train.stage_loop import StageLoop
from raypd.train.step import train_step, trains_only
from raypd.train.store import DirectoryStore
from tests.teachers import perturbed_denoiser
from tests.two_role import CriticMethod
from tests.unit.test_stage_loop import interrupted_at

TINY = ["data.resolution=8", "model.attn_resolutions=[4]", "model.ch=32", "model.ch_mult=[1,2]",
        "distill.batch_size=8", "data.loader_workers=0", "run.device=cpu", "dist.checkpoint_every=4",
        "dist.nonfinite_patience=2", "distill.lr=1e-3", "distill.method=critic_test", "run.log_every=1"]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("roles")
    cfg = load_config(None, TINY)
    save_checkpoint(root / "teacher", perturbed_denoiser(cfg), meta_for(cfg, kind="teacher", sampling_steps=4,
                                                                        round=None))
    shards = training_shards(cfg.data, root / "data", seed=cfg.run.seed)
    stage = Stage("round", "round-00", updates=8, stream=1, sampling_steps=2, shards=shards, round=0,
                  teacher=str(root / "teacher"), student_steps=2, teacher_steps=4)
    return cfg, stage


def _loop(cfg, stage, root: Path) -> StageLoop:
    store = DirectoryStore(root, keep=3)
    return StageLoop(cfg, stage, objective=objective_for(cfg, stage), build_engine=plain_engine, store=store,
                     staging=store.staging, device=torch.device("cpu"))


def test_each_role_steps_on_its_own_ratio_with_its_own_optimizer_and_is_consolidated(made, tmp_path, capsys):
    cfg, stage = made
    loop = _loop(cfg, stage, tmp_path)
    assert list(loop.engines) == ["student", "critic"] and loop.main == "student"
    critic_start = {k: v.clone() for k, v in loop.engines["critic"].model.state_dict().items()}
    loop.run(0)
    assert sorted(loop.role_losses["critic"]) == list(range(1, 9))  # every update
    assert sorted(loop.role_losses["student"]) == [2, 4, 6, 8] == sorted(loop.losses)  # every second one
    assert loop.engines["critic"].updates == 8 and loop.engines["student"].updates == 4
    assert loop.engines["critic"].optimizer is not loop.engines["student"].optimizer
    # each role's schedule runs over its own updates: both decayed to 0 at the end of the stage
    assert [g["lr"] for e in loop.engines.values() for g in e.optimizer.param_groups] == [0.0, 0.0]
    moved = max((v - critic_start[k]).abs().max().item() for k, v in loop.engines["critic"].model.state_dict().items())
    assert moved > 0
    last = tmp_path / "checkpoint_00000008"
    assert (last / "engine.safetensors").is_file() and (last / "roles" / "critic" / "engine.safetensors").is_file()
    assert json.loads((last / "roles" / "critic" / "engine.json").read_text())["client"]["updates"] == 8
    critic = load_file(str(last / "roles" / "critic" / "consolidated.safetensors"))
    assert all(torch.equal(critic[k], v) for k, v in loop.engines["critic"].model.state_dict().items())
    assert (last / "consolidated" / "model.safetensors").is_file()
    metrics = json.loads((last / "metrics.json").read_text())
    assert {"loss", "grad_norm", "lr", "critic_loss", "critic_grad_norm", "critic_lr"} <= set(metrics)
    err = capsys.readouterr().err
    assert "[round 0] 2/8 loss " in err and " critic loss " in err and "[round 0] 1/8 critic loss " in err


def test_a_roles_loss_moves_only_that_roles_weights(made):
    cfg, stage = made
    objective = objective_for(cfg, stage)
    setup = objective.setup(torch.device("cpu"))
    engines = {name: plain_engine(role, setup.batch_size) for name, role in setup.roles.items()}
    nets = {**{n: e.model for n, e in engines.items()}, **setup.frozen}
    batch = Batch(torch.rand(8, 1, 8, 8) * 2 - 1)
    for turn, other in (("student", "critic"), ("critic", "student")):
        before = {k: v.clone() for k, v in engines[other].model.state_dict().items()}
        with trains_only(turn, engines):
            stats = train_step(engines[turn], objective.loss(turn, nets, batch, torch.Generator().manual_seed(0), 1))
            assert all(p.grad is None for p in engines[other].model.parameters())
        assert stats.grad_norm > 0
        assert all(torch.equal(v, before[k]) for k, v in engines[other].model.state_dict().items()), turn
        assert all(p.requires_grad for e in engines.values() for p in e.model.parameters())  # handed back


def test_both_roles_resume_bit_for_bit(made, tmp_path, monkeypatch, capsys):
    cfg, stage = made

    def run(root):
        InProcessRunner(cfg, root / "local", torch.device("cpu"),
                        objectives=lambda s: objective_for(cfg, s)).run(stage, root / "out")
        last = sorted((root / "local" / stage.name).glob("checkpoint_*"))[-1]
        return (load_file(str(root / "out" / "model.safetensors")),
                load_file(str(last / "roles" / "critic" / "consolidated.safetensors")))

    through = run(tmp_path / "through")
    interrupted_at(monkeypatch, 7, lambda: run(tmp_path / "again"))
    resumed = run(tmp_path / "again")
    assert "resumed from the checkpoint at update 4 of 8" in capsys.readouterr().err
    for a, b in zip(through, resumed):
        assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_non_finite_updates_roll_both_roles_back_with_lower_rates(made, tmp_path):
    cfg, stage = made
    loop = _loop(cfg, stage.with_(updates=12), tmp_path)
    original = loop.batches

    def poisoned(start):
        stream = original(start)
        if start != 4 or getattr(poisoned, "done", False):
            return stream
        poisoned.done = True
        return (Batch(torch.full_like(b.x, float("nan")), b.y, b.z) if i < 2 else b for i, b in enumerate(stream))

    loop.batches = poisoned
    loop.run(0)
    assert loop.rollbacks == 1
    # updates 5 and 6: the critic skipped both, the student its one (update 6); then both went back to update 4
    assert (loop.engines["critic"].skipped_updates, loop.engines["student"].skipped_updates) == (2, 1)
    assert loop.engines["student"].base_lr == pytest.approx(0.5e-3)
    assert loop.engines["critic"].base_lr == pytest.approx(0.5 * CriticMethod.Options().lr)
    assert all(torch.isfinite(v).all() for e in loop.engines.values() for v in e.model.state_dict().values())


def test_a_stage_setup_refuses_what_it_cannot_train():
    model = torch.nn.Linear(2, 2)
    role = Role(model, 1e-3, (0.9, 0.999), lambda k: 1.0, 1.0)
    with pytest.raises(ValueError, match="at least one role"):
        StageSetup({}, 8)
    with pytest.raises(ValueError, match="every must be >= 1"):
        StageSetup({"student": Role(model, 1e-3, (0.9, 0.999), lambda k: 1.0, 1.0, every=0)}, 8)
    with pytest.raises(ValueError, match="distinct names"):
        StageSetup({"student": role}, 8, frozen={"student": model})
    with pytest.raises(ValueError, match="not a trained role"):
        StageSetup({"student": role}, 8, averages={"target": Average("critic", 0.9)})


def test_methods_are_registered_by_name_and_check_their_own_section():
    assert {"progressive", "tract", "denoising_student", "critic_test"} <= set(METHODS)
    cfg = load_config(None, [*TINY, "distill.critic_test.every=3", "distill.critic_test.precision=bf16"])
    method = method_for(cfg)
    assert isinstance(method, CriticMethod) and (method.options.every, method.options.precision) == (3, "bf16")
    with pytest.raises(ConfigError, match=r"distill.critic_test.every: must be >= 1"):
        method_for(load_config(None, [*TINY, "distill.critic_test.every=0"]))
    with pytest.raises(ConfigError, match=r"distill.critic_test.evry: unknown key"):
        method_for(load_config(None, [*TINY, "distill.critic_test.evry=2"]))
    with pytest.raises(ConfigError, match="distill.progressive: distill.method=progressive has no settings"):
        method_for(load_config(None, ["distill.progressive.x=1"]))
    with pytest.raises(ConfigError, match="distill.guidance_max: guided distillation does not compose"):
        method_for(load_config(None, [*TINY, "data.num_classes=10", "model.class_dropout=0.1",
                                      "distill.guidance_max=2"]))
    # a saved config round-trips with the method's section in place
    again = load_config(None, [f"{k}={json.dumps(v)}" for k, v in _flat(cfg.to_dict())])
    assert again.to_dict() == cfg.to_dict() and cfg.to_dict()["distill"]["critic_test"]["every"] == 3

    class Other(Method):
        name = "critic_test"

    with pytest.raises(ValueError, match="registered already"):
        register(Other)


def _flat(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            yield from _flat(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value
