"""TRACT as a stage: its settings, its phases, its self-teacher (a bias-corrected EMA of the student), the
distillation working from an exact teacher, and a phase resumed from its checkpoint ending bit for bit where an
uninterrupted one does. The target itself is checked against the analytic teacher in test_diffusion_math."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from raypd.config import ConfigError, DistillConfig, load_config
from raypd.data import Batch
from raypd.diffusion import ddim_sample, logsnr_schedule
from raypd.methods import method_for
from raypd.methods.regression import regression_loss
from raypd.methods.tract import Phase
from raypd.models import Denoiser
from raypd.train import (
    build_plain_engine,
    freeze,
    linear_decay,
    make_student,
    train_step,
)
from raypd.train.ema import EMA
from raypd.train.stage import Stage
from tests.gmm import GaussianMixture
from tests.plans import plan_of
from tests.stages import TINY as TINY_STAGE
from tests.stages import run_stage, teacher_and_shards
from tests.unit.test_distill_end_to_end import MLP, AnalyticTeacher
from tests.unit.test_stage_loop import interrupted_at


def test_tract_settings_are_checked_up_front():
    ok = DistillConfig(method="tract", start_steps=64, options={"tract": {"phases": [8, 1]}})
    assert [(r.teacher_steps, r.student_steps) for r in plan_of(ok)] == [(64, 8), (8, 1)]
    bad = [
        (["distill.method=tract"], "distill.tract.phases: distill.method=tract needs"),
        (["distill.method=tract", "distill.tract.phases=[12,1]"],
         r"distill.tract.phases\[0\]: must be below and divide"),
        (["distill.method=tract", "distill.tract.phases=[8,3]"],
         r"distill.tract.phases\[1\]: must be below and divide .*\(8\)"),
        (["distill.method=tract", "distill.tract.phases=[8,2]"],
         "distill.tract.phases: the last phase must end at end_steps"),
        (["distill.method=tract", "distill.tract.phases=[8,1]", "distill.tract.self_teacher_ema=1.0"],
         r"distill.tract.self_teacher_ema: must lie in \[0, 1\)"),
        (["distill.method=tract", "distill.tract.phase=[8,1]"], "distill.tract.phase: unknown key"),
        (["distill.method=consistent"], "distill.method: no method is called 'consistent'"),
    ]
    for overrides, message in bad:
        with pytest.raises(ConfigError, match=message):
            method_for(load_config(None, overrides))
    # settings that moved into the method's section are refused with their new place
    for key, moved in (("phases", "tract.phases"), ("self_teacher_ema", "tract.self_teacher_ema")):
        with pytest.raises(ConfigError, match=f"distill.{key}: this setting moved to distill.{moved}"):
            load_config(None, [f"distill.{key}=1"])
    # another method's section is still checked: a typo there is no silent no-op
    with pytest.raises(ConfigError, match=r"distill.tract.self_teacher_ema: must lie"):
        method_for(load_config(None, ["distill.tract.self_teacher_ema=2"]))


def test_the_bias_corrected_average_weights_every_update_seen_by_decay_to_its_age():
    decay = 0.7
    model = nn.Linear(3, 2)
    ema = EMA(model, decay, bias_corrected=True)
    seen = []
    for _ in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        seen.append([p.detach().clone() for p in model.parameters()])
        ema.update(model)
    k = len(seen)
    weights = [decay ** (k - 1 - i) for i in range(k)]
    for j, p in enumerate(ema.shadow.parameters()):
        expected = sum(w * s[j] for w, s in zip(weights, seen)) / sum(weights)
        torch.testing.assert_close(p, expected, rtol=1e-5, atol=1e-6)
    assert ema.count == 5
    plain = EMA(nn.Linear(3, 2), decay)
    assert plain.rate() == pytest.approx(1 - decay)  # the teacher's EMA is unchanged: no correction


def test_tract_two_phases_from_an_exact_teacher_beat_its_ddim_at_one_step():
    """8 -> 2 -> 1 (segments of 4 teacher steps, then 2), the self-teacher a bias-corrected EMA of each student."""
    torch.manual_seed(0)
    gmm = GaussianMixture.random(k=4, shape=(2, 1, 1), std=0.05, seed=3, dtype=torch.float32)
    logsnr_fn = functools.partial(logsnr_schedule)
    phases = plan_of(DistillConfig(method="tract", start_steps=8, end_steps=1, options={"tract": {"phases": [2, 1]}},
                                   updates_per_round=400, late_rounds_factor=1.0))
    teacher: nn.Module = AnalyticTeacher(gmm)
    data_gen, noise_gen = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    students = {}
    for phase in phases:
        student = make_student(teacher) if isinstance(teacher, Denoiser) else Denoiser(MLP(2), "x").train()
        updates = 1200 if phase.index == 0 else phase.updates
        engine = build_plain_engine(student, lr=2e-3, betas=(0.9, 0.999), grad_clip=1.0,
                                    schedule=linear_decay(updates))
        self_teacher = EMA(student, 0.5, bias_corrected=True)
        losses = []
        for _ in range(updates):
            nets = {"student": engine.model, "teacher": teacher, "self_teacher": self_teacher.shadow}
            loss = regression_loss(Phase, nets, Batch(gmm.sample(256, data_gen)), student_steps=phase.student_steps,
                                   teacher_steps=phase.teacher_steps, weighting="snr_trunc", logsnr_fn=logsnr_fn,
                                   generator=noise_gen)
            stats = train_step(engine, loss)
            engine.update_average(self_teacher)
            losses.append(stats.loss)
        assert sum(losses[-50:]) < sum(losses[:50]), f"phase {phase.index} did not learn"
        teacher = students[phase.student_steps] = freeze(student)

    z_1 = torch.randn(1024, 2, 1, 1, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        reference = ddim_sample(gmm.denoise, z_1, 256)
        for n, max_ratio in ((1, 0.4), (2, 0.6)):
            ddim_err = (ddim_sample(gmm.denoise, z_1, n) - reference).square().mean().sqrt().item()
            student_err = (ddim_sample(students[n].bind(None), z_1, n) - reference).square().mean().sqrt().item()
            assert student_err < max_ratio * ddim_err, (n, student_err, ddim_err)


TINY = [*TINY_STAGE,
        "distill.method=tract", "distill.tract.phases=[8,1]"]




def test_a_tract_phase_checkpoints_its_self_teacher_and_resumes_bit_for_bit(tmp_path, monkeypatch, capsys):
    cfg = load_config(None, TINY)
    teacher, shards = teacher_and_shards(cfg, tmp_path, 4)
    stage = Stage("round", "round-00", updates=8, stream=1, sampling_steps=1, shards=shards, round=0,
                  teacher=teacher, student_steps=1, teacher_steps=4)
    through, meta = run_stage(cfg, tmp_path / "through", stage)
    assert meta["kind"] == "student" and meta["sampling_steps"] == 1
    last = tmp_path / "through" / "local" / "round-00" / "checkpoint_00000008"
    state = json.loads((last / "engine.json").read_text())["client"]
    assert state["self_teacher_updates"] == 8
    self_teacher = load_file(str(last / "self_teacher.safetensors"))
    assert sorted(self_teacher) == sorted(through)
    # an average of the student's recent weights: neither the student nor the teacher it started from
    start = load_file(str(Path(teacher) / "model.safetensors"))
    assert any(not torch.equal(self_teacher[k], through[k]) for k in through)
    assert any(not torch.equal(self_teacher[k], start[k]) for k in through)

    interrupted_at(monkeypatch, 6, lambda: run_stage(cfg, tmp_path / "again", stage))
    resumed, _ = run_stage(cfg, tmp_path / "again", stage)
    assert "resumed from the checkpoint at update 4 of 8" in capsys.readouterr().err
    # the self-teacher came back with the weights: a fresh one would give other targets from update 5 on
    assert all(torch.equal(resumed[k], through[k]) for k in through)
