"""sCD as a stage: its settings refused up front, the JVP tangent against the finite-difference one and against the
analytic derivative of the consistency function along the teacher's ODE, a one-step student learnt from the
analytic teacher beating the teacher's DDIM, and a stage of two roles (the student and the adaptive weighting)
that resumes bit for bit."""

from __future__ import annotations

import math

import pytest
import torch

from raypd.config import ConfigError, load_config
from raypd.data import Batch
from raypd.diffusion import consistency_sample, ddim_sample, ddim_step, logsnr_schedule
from raypd.methods import method_for, objective_for
from raypd.methods.scd import TARGET, WEIGHTING, ContinuousConsistency, TimeWeighting
from raypd.models import Denoiser
from raypd.train import build_plain_engine, linear_decay, train_step
from raypd.train.ema import EMA
from raypd.train.objective import denoising_loss
from raypd.train.stage import Stage
from tests.gmm import GaussianMixture
from tests.stages import TINY as TINY_STAGE
from tests.stages import run_stage, teacher_and_shards
from tests.teachers import perturbed_denoiser
from tests.unit.test_distill_end_to_end import MLP, AnalyticTeacher
from tests.unit.test_stage_loop import interrupted_at

F64 = torch.float64
SCD = ["distill.method=scd"]
STAGE = Stage("round", "round-00", updates=10, stream=1, sampling_steps=1, round=0, teacher="t", student_steps=1,
              teacher_steps=32)


def test_scd_settings_are_checked_up_front():
    method = method_for(load_config(None, SCD))
    assert [(r.teacher_steps, r.student_steps) for r in method.plan()] == [(32, 1)]
    # the consistency sampler from EDM's s = 80, where training's times end: t = 0.992 on the default schedule
    assert method.sampler == "consistency@0.992071" and method.forwards_per_example() == 7
    bad = [
        (["model.parameterization=x"], "model.parameterization: an x-parameterized student"),
        (["distill.scd.tangent=forward"], "distill.scd.tangent: must be one of 'jvp', 'finite_difference'"),
        (["distill.scd.tangent_norm=0"], "distill.scd.tangent_norm: must be > 0"),
        (["distill.scd.finite_difference_step=0.5"], r"distill.scd.finite_difference_step: must lie in \(0, 0.1\)"),
        (["distill.scd.warmup_updates=-1"], "distill.scd.warmup_updates: must be >= 0"),
        (["data.num_classes=10", "model.class_dropout=0.1", "distill.guidance_max=2"],
         "distill.guidance_max: guided distillation does not compose with distill.method=scd"),
    ]
    for overrides, message in bad:
        with pytest.raises(ConfigError, match=message):
            method_for(load_config(None, [*SCD, *overrides]))


def _objective(*overrides: str) -> ContinuousConsistency:
    return objective_for(load_config(None, [*SCD, *overrides]), STAGE)


class Analytic(torch.nn.Module):
    """A Gaussian mixture's exact denoiser as a network (float64)."""

    def __init__(self, gmm):
        super().__init__()
        self.gmm = gmm

    def forward(self, z, logsnr, y=None):
        return self.gmm.denoise(z, logsnr)


def test_the_jvp_tangent_is_the_finite_difference_one_and_the_analytic_derivative_along_the_ode():
    """g (before normalisation, r = 1) is cos(tau) df/dtau along the teacher's ODE, f the target network's x_hat:
    the JVP's, the central difference's, and a derivative of f along the exact ODE taken by hand agree."""
    teacher_gmm, student_gmm = (GaussianMixture.random(k=3, shape=(1, 2, 2), std=0.2, seed=s) for s in (1, 2))
    nets = {"teacher": Analytic(teacher_gmm), TARGET: Analytic(student_gmm)}
    g = torch.Generator().manual_seed(0)
    b = 6
    jvp, fd = _objective(), _objective("distill.scd.tangent=finite_difference", "distill.scd.finite_difference_step=1e-5")
    tau = jvp.draw_tau(b, g, torch.zeros(1, dtype=F64))
    z = torch.cos(tau)[:, None, None, None] * teacher_gmm.sample(b, g) + \
        torch.sin(tau)[:, None, None, None] * torch.randn(b, 1, 2, 2, generator=g, dtype=F64)
    _, g_jvp = jvp.consistency_tangent(nets, z, tau, None, 1.0)
    _, g_fd = fd.consistency_tangent(nets, z, tau, None, 1.0)
    torch.testing.assert_close(g_jvp, g_fd, rtol=1e-4, atol=1e-6)

    # by hand: f(z(tau'), tau') along the teacher's ODE through (z, tau), tau' = tau +- h (tiny DDIM steps, float64)
    h = 1e-4

    def along(shift: float) -> torch.Tensor:
        there = tau + shift
        lam, lam_there = jvp.logsnr_at(tau), jvp.logsnr_at(there)
        point = ddim_step(z, teacher_gmm.denoise(z, lam), lam, lam_there)
        return student_gmm.denoise(point, lam_there)

    by_hand = torch.cos(tau)[:, None, None, None] * (along(h) - along(-h)) / (2 * h)
    torch.testing.assert_close(g_jvp, by_hand, rtol=1e-4, atol=1e-6)
    assert g_jvp.abs().max() > 1e-2  # a real derivative, not a vanishing one

    # the teacher's own consistency function would give g = 0: the exact ODE endpoint map does not move along it;
    # its denoiser is not that map, so its g is not 0 (the test above is not trivially satisfied by any f)
    _, g_self = jvp.consistency_tangent({"teacher": nets["teacher"], TARGET: nets["teacher"]}, z, tau, None, 1.0)
    assert g_self.abs().max() > 1e-3


def test_the_jvp_passes_through_raypds_unet_and_the_finite_difference_converges_to_it():
    """Through the UNet (attention included, in float64): the central difference's error to the JVP shrinks with
    its step as a second-order difference's does."""
    tiny = ["data.resolution=8", "model.attn_resolutions=[4]", "model.ch=32", "model.ch_mult=[1,2]"]
    cfg = load_config(None, [*SCD, *tiny])
    net = perturbed_denoiser(cfg, 0.05).eval().double()
    jvp = objective_for(cfg, STAGE)
    jvp.check_jvp(net.float(), torch.device("cpu"))  # the fused attention kernels have no JVP: the math kernel runs
    net.double()
    g = torch.Generator().manual_seed(1)
    z = torch.randn(4, 1, 8, 8, generator=g, dtype=F64)
    tau = jvp.draw_tau(4, g, z)
    dx = torch.randn(4, 1, 8, 8, generator=g, dtype=F64)
    value, tangent = jvp.tangent_of(net, z, tau, dx, None)
    errors = []
    for step in (1e-3, 1e-4):
        fd = objective_for(load_config(None, [*SCD, *tiny, "distill.scd.tangent=finite_difference",
                                              f"distill.scd.finite_difference_step={step}"]), STAGE)
        fd_value, fd_tangent = fd.tangent_of(net, z, tau, dx, None)
        torch.testing.assert_close(value, fd_value)
        errors.append((tangent - fd_tangent).abs().max().item())
    assert errors[1] < 5e-3 * tangent.abs().max().item() and errors[1] < errors[0] / 10, errors


def test_the_weighting_scales_the_students_loss_and_learns_from_the_same_updates_residuals():
    objective = _objective("distill.scd.tangent=finite_difference")
    gmm = GaussianMixture.random(k=3, shape=(1, 2, 2), std=0.2, seed=1, dtype=torch.float32)
    student = Denoiser(MLP(4), "v")
    weighting = TimeWeighting()
    nets = {"student": student, "teacher": AnalyticTeacher(gmm), TARGET: student, WEIGHTING: weighting}
    batch = Batch(gmm.sample(32, torch.Generator().manual_seed(0)))

    def student_loss(update: int = 5) -> float:
        return objective.loss("student", nets, batch, torch.Generator().manual_seed(1), update).item()

    plain = student_loss()
    assert 0 < plain <= 1 / 4  # |g / (|g| + c)|^2 / D with D = 4
    # the weighting's loss reads this update's residuals: e^w r - w at w = 0 is their mean
    assert objective.loss(WEIGHTING, nets, batch, None, 5).item() == pytest.approx(plain, rel=1e-6)
    with pytest.raises(RuntimeError, match="after the student, on the residuals of the same update"):
        objective.loss(WEIGHTING, nets, batch, None, 6)
    with torch.no_grad():
        weighting.linear.bias.fill_(math.log(2.0))
    assert student_loss() == pytest.approx(2 * plain, rel=1e-5)
    assert objective.loss(WEIGHTING, nets, batch, None, 5).item() == pytest.approx(2 * plain - math.log(2.0),
                                                                                  rel=1e-5)


def test_the_adaptive_weighting_learns_minus_the_log_of_the_residual():
    weighting = TimeWeighting()
    assert weighting(torch.rand(5)).abs().max() == 0  # starts at w = 0: every time alike
    optimizer = torch.optim.Adam(weighting.parameters(), lr=0.05)
    tau = torch.linspace(0.1, 1.4, 64)
    residual = torch.exp(-3 * tau)  # the loss e^w r - w is least at w = -log r
    for _ in range(600):
        optimizer.zero_grad()
        w = weighting(tau)
        (torch.exp(w) * residual - w).mean().backward()
        optimizer.step()
    torch.testing.assert_close(weighting(tau), 3 * tau, atol=0.15, rtol=0)


SMOOTH = 4
"""Time features of frequency up to 1/2 per unit logsnr: the tangent differentiates the network in logsnr, which
moves as 2 / (sin cos) in tau, so a network that oscillates fast in logsnr has a tangent to match."""


@pytest.fixture(scope="module")
def gmm_and_denoiser():
    """A Gaussian mixture and a small network trained on it by the denoising loss: sCD starts from its teacher's
    weights, and an analytic teacher has none, so the student starts from this approximation of it."""
    torch.manual_seed(0)
    gmm = GaussianMixture.random(k=4, shape=(2, 1, 1), std=0.05, seed=3, dtype=torch.float32)
    net = Denoiser(MLP(2, freqs=SMOOTH), "v").train()
    engine = build_plain_engine(net, lr=2e-3, betas=(0.9, 0.999), grad_clip=1.0, schedule=linear_decay(2000))
    g = torch.Generator().manual_seed(5)
    for _ in range(2000):
        train_step(engine, denoising_loss(net, Batch(gmm.sample(256, g)), weighting="snr_trunc",
                                          logsnr_fn=logsnr_schedule, generator=g))
    return gmm, net.state_dict()


@pytest.mark.parametrize("tangent", ["jvp", "finite_difference"])
def test_scd_makes_its_student_consistent_along_the_teachers_ode(tangent, gmm_and_denoiser):
    """Against the exact teacher's ODE: the held-out inconsistency |g|^2 / D (g = cos(tau) df/dtau along the ODE,
    normalised) falls by nearly half, and the student's one step, from where its sampler starts (s = 80, where
    training's times end), ends well closer to the ODE's endpoint than the network it started from and than the
    exact teacher's own one-step DDIM; the adaptive weighting learns a w that varies with time."""
    gmm, start = gmm_and_denoiser
    updates = 1000
    objective = objective_for(load_config(None, [*SCD, f"distill.scd.tangent={tangent}", "model.parameterization=v",
                                                 "distill.scd.warmup_updates=300"]),
                              STAGE.with_(updates=updates))
    teacher = AnalyticTeacher(gmm)
    student = Denoiser(MLP(2, freqs=SMOOTH), "v")
    student.load_state_dict(start)
    z_1 = torch.randn(1024, 2, 1, 1, generator=torch.Generator().manual_seed(9))
    t_max = float(method_for(load_config(None, SCD)).sampler.split("@")[1])

    def one_step(model):  # the method's sampler: one step from t_max
        return consistency_sample(model.bind(None), z_1, 1, t_max=t_max)

    with torch.no_grad():
        reference = ddim_sample(gmm.denoise, z_1, 256)
        start_err = (one_step(student.eval()) - reference).square().mean().sqrt().item()
    part = objective.make_heldout(Batch(gmm.sample(512, torch.Generator().manual_seed(7))), seed=8)
    with torch.no_grad():
        inconsistency = objective.heldout_losses({"student": student, "teacher": teacher}, part).mean().item()
    student.train()
    engine = build_plain_engine(student, lr=5e-4, betas=(0.9, 0.99), grad_clip=1.0, schedule=linear_decay(updates))
    weighting = build_plain_engine(TimeWeighting(), lr=5e-4, betas=(0.9, 0.99), grad_clip=1.0,
                                   schedule=linear_decay(updates))
    target = EMA(student, 0.0)
    data_gen, noise_gen = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    for update in range(1, updates + 1):
        nets = {"student": engine.model, "teacher": teacher, TARGET: target.shadow, WEIGHTING: weighting.model}
        batch = Batch(gmm.sample(256, data_gen))
        stats = train_step(engine, objective.loss("student", nets, batch, noise_gen, update))
        assert math.isfinite(stats.loss)
        train_step(weighting, objective.loss(WEIGHTING, nets, batch, noise_gen, update))
        engine.update_average(target)
    with torch.no_grad():
        student_err = (one_step(student.eval()) - reference).square().mean().sqrt().item()
        w = weighting.model(torch.linspace(0.2, 1.4, 8))
        after = objective.heldout_losses({"student": student, "teacher": teacher}, part).mean().item()
    print(f"one step: {start_err:.3f} -> {student_err:.3f}; held-out |g|^2/D {inconsistency:.3g} -> {after:.3g}")
    assert after < 0.6 * inconsistency, (inconsistency, after)
    assert student_err < 0.7 * start_err, (student_err, start_err)
    ddim_err = (ddim_sample(gmm.denoise, z_1, 1) - reference).square().mean().sqrt().item()
    assert student_err < 0.6 * ddim_err, (student_err, ddim_err)  # the exact teacher's own one step
    assert (w.max() - w.min()).item() > 0.05


TINY = [*TINY_STAGE, *SCD,
        "distill.scd.warmup_updates=6"]




def test_an_scd_stage_checkpoints_both_roles_and_resumes_bit_for_bit(tmp_path, monkeypatch, capsys):
    cfg = load_config(None, TINY)
    teacher, shards = teacher_and_shards(cfg, tmp_path, 8)
    stage = STAGE.with_(updates=9, shards=shards, teacher=teacher)
    through, meta = run_stage(cfg, tmp_path / "through", stage)
    assert meta["kind"] == "student" and meta["metrics"]["weighting_final_loss"] is not None
    last = tmp_path / "through" / "local" / "round-00" / "checkpoint_00000008"
    assert (last / "roles" / WEIGHTING).is_dir() and (last / f"{TARGET}.safetensors").is_file()
    interrupted_at(monkeypatch, 6, lambda: run_stage(cfg, tmp_path / "again", stage))
    resumed, _ = run_stage(cfg, tmp_path / "again", stage)
    assert "resumed from the checkpoint at update 4 of 9" in capsys.readouterr().err
    assert all(torch.equal(resumed[k], through[k]) for k in through)


def test_without_adaptive_weighting_the_stage_trains_the_student_alone(tmp_path):
    cfg = load_config(None, [*TINY, "distill.scd.adaptive_weighting=false"])
    teacher, shards = teacher_and_shards(cfg, tmp_path, 8)
    student, meta = run_stage(cfg, tmp_path / "run", STAGE.with_(updates=4, shards=shards, teacher=teacher))
    last = tmp_path / "run" / "local" / "round-00" / "checkpoint_00000004"
    assert not (last / "roles").exists() and (last / f"{TARGET}.safetensors").is_file()
    assert "weighting_final_loss" not in meta["metrics"] and math.isfinite(meta["metrics"]["final_loss"])
