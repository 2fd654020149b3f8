"""Consistency distillation as a stage: its settings refused up front, its curriculum, the boundary condition met
by the parameterization, its target against the exact ODE map of the analytic teacher, its sampler, a student
learnt from the analytic teacher beating the teacher's DDIM at its steps, and a stage that resumes bit for bit with
its target network and curriculum."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from raypd.config import ConfigError, load_config
from raypd.data import Batch
from raypd.diffusion import (
    consistency_sample,
    ddim_sample,
    ddim_step,
    diffuse,
    logsnr_schedule,
    tract_target,
)
from raypd.diffusion.params import output_channels
from raypd.methods import method_for, objective_for
from raypd.methods.consistency import (
    TARGET,
    ConsistencyStage,
    pseudo_huber,
    teacher_grid,
)
from raypd.models import Denoiser
from raypd.train import build_plain_engine, linear_decay, train_step
from raypd.train.ema import EMA
from raypd.train.stage import Stage
from tests.gmm import GaussianMixture
from tests.stages import TINY as TINY_STAGE
from tests.stages import run_stage, teacher_and_shards
from tests.unit.test_distill_end_to_end import MLP, AnalyticTeacher
from tests.unit.test_stage_loop import interrupted_at

F64 = torch.float64
CM = ["distill.method=consistency"]


def test_consistency_settings_are_checked_up_front():
    method = method_for(load_config(None, CM))
    assert [(r.teacher_steps, r.student_steps) for r in method.plan()] == [(32, 1)]
    assert method.sampler == "consistency"
    multistep = method_for(load_config(None, [*CM, "distill.consistency.segments=4", "distill.end_steps=4"]))
    assert [(r.teacher_steps, r.student_steps) for r in multistep.plan()] == [(32, 4)]
    assert multistep.sampler == "ddim"
    # one segment samples in any step count (the consistency sampler): the stage's student steps are end_steps
    assert [r.student_steps for r in method_for(load_config(None, [*CM, "distill.end_steps=2"])).plan()] == [2]
    bad = [
        (["distill.consistency.segments=2"], "distill.end_steps: a multistep consistency student samples in its "
                                             "segments .*set distill.end_steps=2"),
        (["distill.consistency.segments=16", "distill.end_steps=16", "distill.consistency.initial_steps=8"],
         "distill.consistency.segments: 16 segments do not divide the teacher's 8-step grid"),
        (["distill.consistency.initial_steps=12"], "distill.consistency.initial_steps: .*divided by a power of two"),
        (["distill.consistency.initial_steps=64"], "distill.consistency.initial_steps: .*divided by a power of two"),
        (["distill.consistency.target_ema=1"], r"distill.consistency.target_ema: must lie in \[0, 1\)"),
        (["distill.consistency.huber_c=0"], "distill.consistency.huber_c: must be > 0"),
        (["distill.consistency.distance=lpips"], "distill.consistency.distance: LPIPS .*use pseudo_huber"),
        (["distill.consistency.segments=0"], "distill.consistency.segments: must be >= 1"),
        (["distill.consistency.initial_steps=1", "distill.updates_per_round=4"],
         "distill.consistency.initial_steps: the curriculum doubles the grid 5 times .* 4 updates"),
        (["model.parameterization=x"], "model.parameterization: an x-parameterized student does not meet the "
                                       "consistency boundary condition"),
    ]
    for overrides, message in bad:
        with pytest.raises(ConfigError, match=message):
            method_for(load_config(None, [*CM, *overrides]))


def test_the_curriculum_doubles_the_teacher_grid_in_equal_parts_of_the_stage():
    grids = [teacher_grid(k, 800, 4, 32) for k in range(1, 801)]
    assert grids[0] == 4 and grids[199] == 4 and grids[200] == 8 and grids[400] == 16 and grids[600:] == [32] * 200
    assert [teacher_grid(k, 10, 32, 32) for k in (1, 10)] == [32, 32]  # no curriculum
    assert teacher_grid(7, 7, 1, 1024) == 64  # more doublings than updates: the grid still ends below the final one

    # the stage draws its times on the grid of the update it computes, and its held-out set on the final grid
    cfg = load_config(None, [*CM, "distill.start_steps=16", "distill.consistency.initial_steps=4"])
    stage = Stage("round", "round-00", updates=30, stream=1, sampling_steps=1, round=0, teacher="t",
                  student_steps=1, teacher_steps=16)
    objective = objective_for(cfg, stage)
    assert isinstance(objective, ConsistencyStage) and objective.grid_at(1) == 4 and objective.grid_at(30) == 16
    seen = []
    objective.target = lambda nets, z_t, t, y, w: seen.append(t.clone()) or torch.zeros_like(z_t)
    student = Denoiser(MLP(4), "eps")
    x = torch.zeros(64, 1, 2, 2)
    for update in (1, 11, 21):
        objective.loss("student", {"student": student}, Batch(x), torch.Generator().manual_seed(0), update)
    for t, steps in zip(seen, (4, 8, 16)):
        assert torch.allclose(t * steps, (t * steps).round()) and (t * steps).round().unique().numel() > steps // 2
        assert t.min() >= 1 / steps and t.max() <= 1
    seen.clear()
    part = objective.make_heldout(Batch(x), seed=3)
    objective.heldout_losses({"student": student}, part)
    assert torch.allclose(seen[0] * 16, (seen[0] * 16).round())


class Pointwise(nn.Module):
    """A backbone whose output is a random function of z and logsnr, with the channels a parameterization needs."""

    def __init__(self, channels: int, parameterization: str):
        super().__init__()
        self.conv = nn.Conv2d(channels + 1, output_channels(parameterization, channels), 1)

    def forward(self, z, logsnr, y=None):
        level = logsnr[:, None, None, None].expand(z.shape[0], 1, *z.shape[2:])
        return 10 * torch.tanh(self.conv(torch.cat([z, level / 20], 1)))


@pytest.mark.parametrize("parameterization", ["eps", "v", "both"])
def test_the_boundary_condition_holds_by_parameterization(parameterization):
    torch.manual_seed(0)
    student = Denoiser(Pointwise(3, parameterization), parameterization).double()
    z = torch.randn(16, 3, 4, 4, dtype=F64)
    logsnr_0 = logsnr_schedule(torch.zeros(16, dtype=F64))
    alpha_0 = torch.sigmoid(logsnr_0)[0].sqrt()
    x_hat = student(z, logsnr_0)
    # f(z, 0) = z / alpha_0 up to sigma_0 = e^-10 times an output of size <= 10 (per head)
    assert (x_hat - z / alpha_0).abs().max().item() < 10 * 2 * math.exp(-10) * 1.01
    # and the x parameterization does not meet it, which is why the method refuses it
    x_param = Denoiser(Pointwise(3, "x"), "x").double()
    assert (x_param(z, logsnr_0) - z / alpha_0).abs().max().item() > 0.1


def _t_of(logsnr: torch.Tensor) -> torch.Tensor:
    """The cosine schedule's t at ``logsnr`` (the inverse of logsnr_schedule with its default bounds)."""
    b = math.atan(math.exp(-10.0))
    a = math.atan(math.exp(10.0)) - b
    return (torch.atan(torch.exp(-logsnr / 2)) - b) / a


def _ode(gmm, z: torch.Tensor, t: torch.Tensor, s: float, steps: int = 4096) -> torch.Tensor:
    """The probability-flow ODE's solution from (z, t) to s, per example, by a fine DDIM of the exact denoiser."""
    out = []
    for row in range(z.shape[0]):
        point, here = z[row:row + 1], float(t[row])
        n = max(1, round(steps * (here - s)))
        for i in range(n):
            a, b = here - i * (here - s) / n, here - (i + 1) * (here - s) / n
            la, lb = logsnr_schedule(torch.tensor([a], dtype=F64)), logsnr_schedule(torch.tensor([b], dtype=F64))
            point = ddim_step(point, gmm.denoise(point, la), la, lb) if b > 0 else gmm.denoise(point, la)
        out.append(point)
    return torch.cat(out)


def _exact_consistency(gmm, segments: int):
    """The exact multistep consistency function: from (z, t) to the x whose DDIM step to t's segment start lands
    on the ODE's solution there (at the segment start 0: that solution, the ODE's endpoint)."""

    def f(z, logsnr):
        t = _t_of(logsnr.to(F64)).clamp(0, 1)
        out = []
        for row in range(z.shape[0]):
            here = float(t[row])
            s = max(0.0, math.ceil(here * segments - 1e-9) / segments - 1 / segments)
            point = _ode(gmm, z[row:row + 1], t[row:row + 1], s, steps=1024)
            if s == 0:
                out.append(point)
                continue
            lt, ls = logsnr[row:row + 1].to(F64), logsnr_schedule(torch.tensor([s], dtype=F64))
            alpha_t, sigma_t = torch.sigmoid(lt).sqrt(), torch.sigmoid(-lt).sqrt()
            alpha_s, sigma_s = torch.sigmoid(ls).sqrt(), torch.sigmoid(-ls).sqrt()
            ratio = sigma_s / sigma_t
            out.append((point - ratio * z[row:row + 1]) / (alpha_s - ratio * alpha_t))
        return torch.cat(out)

    return f


@pytest.mark.parametrize("segments", [1, 2])
def test_the_target_from_the_exact_consistency_function_is_the_ode_map_in_the_limit(segments):
    """With the analytic teacher and the exact consistency function as the target network, the target is the
    exact ODE solution's map (to t's segment start) up to the teacher's one DDIM step, whose error vanishes as
    the grid refines."""
    gmm = GaussianMixture.random(k=3, shape=(1, 2, 1), std=0.1, seed=4)
    f = _exact_consistency(gmm, segments)
    errors = {}
    for steps in (8, 64, 512):
        g = torch.Generator().manual_seed(1)
        k = torch.randint(1, steps + 1, (6,), generator=g)
        k = torch.where(k % (steps // segments) == 1, k + 1, k)  # off the segments' first step (no DDIM there)
        t = k.to(F64) / steps
        z_t = diffuse(gmm.sample(6, g), torch.randn(6, 1, 2, 1, generator=g, dtype=F64), logsnr_schedule(t))
        target = tract_target(gmm.denoise, f, z_t, t, steps, segments)
        starts = torch.clamp(torch.ceil(t * segments - 1e-9) / segments - 1 / segments, min=0)
        exact = torch.cat([_ode(gmm, z_t[i:i + 1], t[i:i + 1], float(starts[i]), steps=1024) for i in range(6)])
        landed = torch.stack([target[i] if starts[i] == 0 else ddim_step(
            z_t[i:i + 1], target[i:i + 1], logsnr_schedule(t[i:i + 1]), logsnr_schedule(starts[i:i + 1]))[0]
            for i in range(6)])
        errors[steps] = (landed - exact).abs().max().item()
    assert errors[512] < 2e-3 and errors[512] < errors[8] / 10, errors


def test_the_consistency_sampler_renoises_each_x_hat_and_is_ddim_at_one_step():
    gmm = GaussianMixture.random(k=4, shape=(1, 2, 2), seed=5)
    z_1 = torch.randn(8, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    one = consistency_sample(gmm.denoise, z_1, 1, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(one, ddim_sample(gmm.denoise, z_1, 1), rtol=0, atol=0)
    # started below pure noise: z_1 taken as the point at t_max
    low = consistency_sample(gmm.denoise, z_1, 1, clip=False, t_max=0.9)
    torch.testing.assert_close(low, gmm.denoise(z_1, logsnr_schedule(torch.full((8,), 0.9, dtype=F64))))
    two = consistency_sample(gmm.denoise, z_1, 2, clip=False, generator=torch.Generator().manual_seed(1))
    half = logsnr_schedule(torch.full((8,), 0.5, dtype=F64))
    x_hat = gmm.denoise(z_1, logsnr_schedule(torch.ones(8, dtype=F64)))
    noise = torch.randn(z_1.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    torch.testing.assert_close(two, gmm.denoise(diffuse(x_hat, noise, half), half))


def test_pseudo_huber_is_the_norm_far_away_and_half_the_squared_norm_over_c_near():
    a = torch.zeros(2, 1, 10, 10)
    b = torch.zeros(2, 1, 10, 10)
    b[0, 0, 0, 0], b[1, 0, 0, 0] = 3.0, 1e-4
    c = 0.00054 * 10
    got = pseudo_huber(a, b, 0.00054)
    assert got[0].item() == pytest.approx(3.0 - c, rel=1e-4)
    assert got[1].item() == pytest.approx(1e-8 / (2 * c), rel=1e-2)


@pytest.mark.parametrize("segments,target_ema", [(1, 0.0), (2, 0.95)])
def test_a_consistency_student_of_the_exact_teacher_beats_its_ddim(segments, target_ema):
    """From an 8-step teacher grid (a curriculum from 2 steps): 1 step, the student itself as target (iCT), and
    2 segments with an EMA target network; each far closer to the ODE's samples than the teacher's own DDIM."""
    torch.manual_seed(0)
    gmm = GaussianMixture.random(k=4, shape=(2, 1, 1), std=0.05, seed=3, dtype=torch.float32)
    cfg = load_config(None, [*CM, f"distill.consistency.segments={segments}", f"distill.end_steps={segments}",
                             "distill.start_steps=8", "distill.consistency.initial_steps=2",
                             f"distill.consistency.target_ema={target_ema}", "distill.consistency.distance=l2",
                             "model.parameterization=v"])
    updates = 1500
    stage = Stage("round", "round-00", updates=updates, stream=1, sampling_steps=segments, round=0, teacher="t",
                  student_steps=segments, teacher_steps=8)
    objective = objective_for(cfg, stage)
    teacher = AnalyticTeacher(gmm)
    student = Denoiser(MLP(2), "v").train()
    engine = build_plain_engine(student, lr=2e-3, betas=(0.9, 0.999), grad_clip=1.0, schedule=linear_decay(updates))
    target = EMA(student, target_ema)
    data_gen, noise_gen = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    losses = []
    for update in range(1, updates + 1):
        nets = {"student": engine.model, "teacher": teacher, TARGET: target.shadow}
        losses.append(train_step(engine, objective.loss("student", nets, Batch(gmm.sample(256, data_gen)),
                                                        noise_gen, update)).loss)
        engine.update_average(target)
    assert all(math.isfinite(v) for v in losses)
    z_1 = torch.randn(1024, 2, 1, 1, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        reference = ddim_sample(gmm.denoise, z_1, 256)
        ddim_err = (ddim_sample(gmm.denoise, z_1, segments) - reference).square().mean().sqrt().item()
        student_err = (ddim_sample(student.eval().bind(None), z_1, segments) - reference).square().mean().sqrt().item()
    assert student_err < 0.5 * ddim_err, (student_err, ddim_err)
    if segments == 2:  # its first step jumps to the segment's start, t = 1/2, on the ODE (not to the data)
        z, one = z_1[:64], torch.ones(64)
        exact = _ode(gmm, z, one, 0.5, steps=256)
        lam_1, lam_half = logsnr_schedule(one), logsnr_schedule(one / 2)
        with torch.no_grad():
            jumped = ddim_step(z, student(z, lam_1), lam_1, lam_half)
        teacher_jump = ddim_step(z, gmm.denoise(z, lam_1), lam_1, lam_half)
        jump_err, teacher_err = ((p - exact).square().mean().sqrt().item() for p in (jumped, teacher_jump))
        assert jump_err < 0.5 * teacher_err, (jump_err, teacher_err)


TINY = [*TINY_STAGE, *CM,
        "distill.start_steps=8", "distill.consistency.initial_steps=2", "distill.consistency.target_ema=0.9"]




def test_a_consistency_stage_checkpoints_its_target_network_and_resumes_bit_for_bit(tmp_path, monkeypatch, capsys):
    """The target network and the curriculum's place (2, 4, 8 teacher steps over 9 updates) come back from the
    checkpoint at update 4: the resumed stage ends on the same weights."""
    cfg = load_config(None, TINY)
    teacher, shards = teacher_and_shards(cfg, tmp_path, 8)
    stage = Stage("round", "round-00", updates=9, stream=1, sampling_steps=1, shards=shards, round=0,
                  teacher=teacher, student_steps=1, teacher_steps=8)
    through, meta = run_stage(cfg, tmp_path / "through", stage)
    assert meta["kind"] == "student" and meta["sampling_steps"] == 1
    last = tmp_path / "through" / "local" / "round-00" / "checkpoint_00000008"
    assert json.loads((last / "engine.json").read_text())["client"]["target_updates"] == 8
    target = load_file(str(last / "target.safetensors"))
    start = load_file(str(Path(teacher) / "model.safetensors"))
    assert sorted(target) == sorted(through) and any(not torch.equal(target[k], start[k]) for k in through)

    interrupted_at(monkeypatch, 6, lambda: run_stage(cfg, tmp_path / "again", stage))
    resumed, _ = run_stage(cfg, tmp_path / "again", stage)
    assert "resumed from the checkpoint at update 4 of 9" in capsys.readouterr().err
    assert all(torch.equal(resumed[k], through[k]) for k in through)
