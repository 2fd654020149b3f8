"""Every formula of raypd.diffusion against an independent float64 computation."""

import math

import pytest
import torch

from raypd.diffusion import (
    alpha_sigma, ddim_sample, ddim_step, diffuse, distill_target, eps_from_x, logsnr_schedule, tract_target,
    loss_weight, stochastic_sample, student_times, weighted_mse, x_from_output,
)
from raypd.diffusion.ddim import ancestral_step
from raypd.diffusion.params import PARAMETERIZATIONS, output_target
from tests.gmm import GaussianMixture

F64 = torch.float64


def ref_logsnr(t, lo=-20.0, hi=20.0):
    b = math.atan(math.exp(-hi / 2))
    a = math.atan(math.exp(-lo / 2)) - b
    return -2 * math.log(math.tan(a * t + b))


def ref_alpha_sigma(lam):
    return math.sqrt(1 / (1 + math.exp(-lam))), math.sqrt(1 / (1 + math.exp(lam)))


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_schedule_matches_formula_and_endpoints(dtype):
    t = torch.linspace(0, 1, 33, dtype=dtype)
    got = logsnr_schedule(t)
    want = torch.tensor([ref_logsnr(v) for v in t.double().tolist()], dtype=dtype)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4 if dtype == torch.float32 else 1e-10)
    assert got[0].item() == pytest.approx(20.0, abs=1e-3) and got[-1].item() == pytest.approx(-20.0, abs=1e-3)
    assert torch.all(got[1:] < got[:-1])
    alpha, sigma = alpha_sigma(got)
    assert alpha[-1].item() == pytest.approx(4.54e-5, rel=1e-2)  # not exactly 0 at t = 1
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones_like(alpha))
    assert got.dtype == dtype


def test_schedule_custom_bounds_and_errors():
    t = torch.tensor([0.0, 0.3, 1.0], dtype=F64)
    got = logsnr_schedule(t, logsnr_min=-10.0, logsnr_max=8.0)
    torch.testing.assert_close(got, torch.tensor([ref_logsnr(v, -10, 8) for v in t.tolist()], dtype=F64))
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]"):
        logsnr_schedule(torch.tensor([1.5]))
    with pytest.raises(ValueError, match="logsnr_min"):
        logsnr_schedule(torch.tensor([0.5]), logsnr_min=5.0, logsnr_max=1.0)


def test_diffuse_and_eps_from_x_per_example():
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(3, 2, 4, 4, generator=g, dtype=F64), torch.randn(3, 2, 4, 4, generator=g, dtype=F64)
    lam = torch.tensor([-5.0, 0.0, 7.0], dtype=F64)
    z = diffuse(x, eps, lam)
    for b in range(3):
        a, s = ref_alpha_sigma(lam[b].item())
        torch.testing.assert_close(z[b], a * x[b] + s * eps[b])
    torch.testing.assert_close(eps_from_x(x, z, lam), eps)
    with pytest.raises(ValueError, match=r"logsnr must have shape \[B\] = \[3\]"):
        diffuse(x, eps, lam[:2])
    with pytest.raises(ValueError, match="eps has shape"):
        diffuse(x, eps[:, :1], lam)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("param", PARAMETERIZATIONS)
def test_parameterization_round_trip(param, dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(4, 3, 5, 5, generator=g, dtype=dtype) * 2 - 1
    eps = torch.randn(4, 3, 5, 5, generator=g, dtype=dtype)
    lam = torch.tensor([-6.0, -1.0, 2.0, 6.0], dtype=dtype)
    z = diffuse(x, eps, lam)
    out = output_target(x, eps, lam, param)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(x_from_output(out, z, lam, param), x, **tol)


def test_parameterization_formulas_independent():
    lam, z, out = 1.3, 0.7, -0.4
    a, s = ref_alpha_sigma(lam)
    t = lambda v: torch.tensor([[v]], dtype=F64).reshape(1, 1, 1, 1)  # noqa: E731
    L = torch.tensor([lam], dtype=F64)
    assert x_from_output(t(out), t(z), L, "eps").item() == pytest.approx((z - s * out) / a)
    assert x_from_output(t(out), t(z), L, "x").item() == pytest.approx(out)
    assert x_from_output(t(out), t(z), L, "v").item() == pytest.approx(a * z - s * out)
    both = torch.tensor([out, 0.25], dtype=F64).reshape(1, 2, 1, 1)
    assert x_from_output(both, t(z), L, "both").item() == pytest.approx(s**2 * out + a * (z - s * 0.25))


def test_parameterization_errors():
    z = torch.zeros(2, 3, 4, 4)
    lam = torch.zeros(2)
    with pytest.raises(ValueError, match="unknown parameterization 'mu'"):
        x_from_output(z, z, lam, "mu")
    with pytest.raises(ValueError, match="'both' needs an output with 2C = 6 channels"):
        x_from_output(z, z, lam, "both")
    with pytest.raises(ValueError, match="output has shape"):
        x_from_output(torch.zeros(2, 1, 4, 4), z, lam, "x")


def test_loss_weights_equal_mses_in_other_spaces():
    g = torch.Generator().manual_seed(2)
    x = torch.rand(6, 1, 4, 4, generator=g, dtype=F64) * 2 - 1
    eps = torch.randn(6, 1, 4, 4, generator=g, dtype=F64)
    lam = torch.tensor([-8.0, -2.0, -0.1, 0.1, 3.0, 9.0], dtype=F64)
    z = diffuse(x, eps, lam)
    x_hat = x + 0.1 * torch.randn(x.shape, generator=g, dtype=F64)
    a, s = alpha_sigma(lam.reshape(-1, 1, 1, 1))
    mean = lambda d: d.square().flatten(1).mean(1)  # noqa: E731
    x_mse, eps_mse = mean(x_hat - x), mean(eps_from_x(x_hat, z, lam) - eps)
    v_mse = mean((a * eps_from_x(x_hat, z, lam) - s * x_hat) - (a * eps - s * x))
    torch.testing.assert_close(weighted_mse(x_hat, x, lam, "constant"), x_mse)
    torch.testing.assert_close(weighted_mse(x_hat, x, lam, "snr"), eps_mse)
    torch.testing.assert_close(weighted_mse(x_hat, x, lam, "snr_trunc"), torch.maximum(x_mse, eps_mse))
    torch.testing.assert_close(weighted_mse(x_hat, x, lam, "snr+1"), v_mse)
    torch.testing.assert_close(loss_weight(lam, "snr_trunc"), torch.clamp(lam.exp(), min=1))
    with pytest.raises(ValueError, match="unknown loss weighting 'l1'"):
        loss_weight(lam, "l1")


def test_ddim_step_with_true_x_follows_the_forward_process():
    g = torch.Generator().manual_seed(3)
    x, eps = torch.randn(2, 1, 3, 3, generator=g, dtype=F64), torch.randn(2, 1, 3, 3, generator=g, dtype=F64)
    lt, ls = torch.tensor([-3.0, 1.0], dtype=F64), torch.tensor([2.0, 4.0], dtype=F64)
    torch.testing.assert_close(ddim_step(diffuse(x, eps, lt), x, lt, ls), diffuse(x, eps, ls))


def ref_two_teacher_steps(teacher, z, t, n):
    """z_t'' by two DDIM steps written out from scratch, scalar per example."""
    out = []
    for b in range(z.shape[0]):
        zb, tb = z[b:b + 1], t[b].item()
        cur, tcur = zb, tb
        for tn in (tb - 0.5 / n, tb - 1.0 / n):
            lc, ln = ref_logsnr(tcur), ref_logsnr(max(tn, 0.0))
            (ac, sc), (an, sn) = ref_alpha_sigma(lc), ref_alpha_sigma(ln)
            xh = teacher(cur, torch.tensor([lc], dtype=F64))
            cur, tcur = an * xh + sn * (cur - ac * xh) / sc, tn
        out.append(cur)
    return torch.cat(out)


@pytest.mark.parametrize("n", [1, 2, 4, 8, 64])
def test_one_student_step_onto_target_lands_on_two_teacher_steps(n):
    gmm = GaussianMixture.random(k=5, shape=(2, 3, 3), seed=n)
    g = torch.Generator().manual_seed(10 + n)
    i = torch.arange(n).repeat_interleave(2)
    t = (i + 1).to(F64) / n
    x, eps = gmm.sample(t.shape[0], g), torch.randn(t.shape[0], 2, 3, 3, generator=g, dtype=F64)
    z_t = diffuse(x, eps, logsnr_schedule(t))
    x_tilde = distill_target(gmm.denoise, z_t, t, n)
    t_end = (t - 1 / n).clamp(min=0)
    landed = ddim_step(z_t, x_tilde, logsnr_schedule(t), logsnr_schedule(t_end))
    want = ref_two_teacher_steps(gmm.denoise, z_t, t, n)
    has_next = i >= 1
    if has_next.any():
        err = (landed[has_next] - want[has_next]).abs().max().item()
        assert err < 1e-6, err
    # i = 0: the target is the teacher's second x_hat, from z_t' (not z_t)
    last = ~has_next
    lt, lm = logsnr_schedule(t[last]), logsnr_schedule(t[last] - 0.5 / n)
    z_mid = ddim_step(z_t[last], gmm.denoise(z_t[last], lt), lt, lm)
    torch.testing.assert_close(x_tilde[last], gmm.denoise(z_mid, lm), rtol=0, atol=1e-12)


def test_target_is_not_the_teacher_midpoint_prediction():
    """The inverted x_tilde differs from the teacher's mid-point x_hat (a known defect to avoid)."""
    gmm = GaussianMixture.random(k=4, shape=(1, 4, 4), seed=5)
    g = torch.Generator().manual_seed(0)
    n = 4
    t = torch.full((64,), 3 / n, dtype=F64)
    z_t = diffuse(gmm.sample(64, g), torch.randn(64, 1, 4, 4, generator=g, dtype=F64), logsnr_schedule(t))
    lt, lm = logsnr_schedule(t), logsnr_schedule(t - 0.5 / n)
    x_mid = gmm.denoise(ddim_step(z_t, gmm.denoise(z_t, lt), lt, lm), lm)
    assert (distill_target(gmm.denoise, z_t, t, n) - x_mid).abs().mean() > 1e-3


def test_target_rejects_times_off_the_student_grid():
    z = torch.zeros(2, 1, 2, 2, dtype=F64)
    teacher = lambda z, lam: torch.zeros_like(z)  # noqa: E731
    for bad in ([0.3, 0.5], [0.0, 0.5], [0.5, 1.25]):
        with pytest.raises(ValueError, match="not on the 4-step student grid"):
            distill_target(teacher, z, torch.tensor(bad, dtype=F64), 4)
    with pytest.raises(ValueError, match=r"t must have shape \[B\] = \[2\]"):
        distill_target(teacher, z, torch.tensor([0.5], dtype=F64), 4)


def test_student_times_cover_the_grid_including_one_and_never_zero():
    t = student_times(4000, 8, generator=torch.Generator().manual_seed(0))
    assert set((t * 8).round().long().tolist()) == set(range(1, 9))


def test_ddim_with_exact_denoiser_converges_as_steps_grow():
    gmm = GaussianMixture.random(k=6, shape=(1, 2, 2), std=0.05, seed=7)
    z_1 = torch.randn(256, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    ref = ddim_sample(gmm.denoise, z_1, 2048, clip=False)
    errs = [(ddim_sample(gmm.denoise, z_1, n, clip=False) - ref).square().mean().item() for n in (1, 4, 16, 64, 256)]
    assert all(b < a for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 1e-3 * errs[0]
    # many-step samples land near the data: each sample close to some mixture mean
    dist = torch.cdist(ref.reshape(256, -1), gmm.means).min(1).values
    assert dist.median() < 3 * gmm.std * 2


def test_ddim_sample_clip_and_step_count_errors():
    big = lambda z, lam: torch.full_like(z, 5.0)  # noqa: E731
    z = torch.randn(3, 1, 2, 2)
    assert ddim_sample(big, z, 3).max() == 1.0
    assert ddim_sample(big, z, 3, clip=False).max() == 5.0
    with pytest.raises(ValueError, match="n_steps must be a positive integer"):
        ddim_sample(big, z, 0)


def test_ancestral_step_matches_posterior_and_its_variance_bounds():
    x, z_t = torch.tensor([0.3], dtype=F64).reshape(1, 1, 1, 1), torch.tensor([0.9], dtype=F64).reshape(1, 1, 1, 1)
    lt, ls = -1.0, 2.0
    (at, st), (as_, ss) = ref_alpha_sigma(lt), ref_alpha_sigma(ls)
    a_ts = at / as_
    var_ts = st**2 - a_ts**2 * ss**2
    mean = a_ts * ss**2 / st**2 * 0.9 + as_ * var_ts / st**2 * 0.3
    L = lambda v: torch.tensor([v], dtype=F64)  # noqa: E731
    zero, one = torch.zeros_like(x), torch.ones_like(x)
    assert ancestral_step(z_t, x, L(lt), L(ls), zero, 0.0).item() == pytest.approx(mean)
    lower = ancestral_step(z_t, x, L(lt), L(ls), one, 0.0).item() - mean
    upper = ancestral_step(z_t, x, L(lt), L(ls), one, 1.0).item() - mean
    r = math.exp(lt - ls)
    assert lower**2 == pytest.approx(var_ts * ss**2 / st**2) and lower**2 == pytest.approx((1 - r) * ss**2)
    assert upper**2 == pytest.approx((1 - r) * st**2)


def test_stochastic_sample_seeded_and_exact_on_a_point_mass():
    point = GaussianMixture(torch.tensor([[0.5, -0.25]], dtype=F64), std=0.0, shape=(2, 1, 1))
    z_1 = torch.randn(8, 2, 1, 1, dtype=F64, generator=torch.Generator().manual_seed(0))
    out = stochastic_sample(point.denoise, z_1, 16, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out, point.means.reshape(1, 2, 1, 1).expand(8, 2, 1, 1))
    gmm = GaussianMixture.random(k=3, shape=(1, 2, 2), seed=0)
    a = stochastic_sample(gmm.denoise, z_1.reshape(8, 1, 2, 1).expand(8, 1, 2, 2).contiguous(), 8,
                          generator=torch.Generator().manual_seed(2))
    b = stochastic_sample(gmm.denoise, z_1.reshape(8, 1, 2, 1).expand(8, 1, 2, 2).contiguous(), 8,
                          generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="interp must lie in"):
        stochastic_sample(gmm.denoise, z_1, 4, interp=1.5)


def _ddim(denoise, z, t_from, t_to):
    lf, lt = logsnr_schedule(t_from), logsnr_schedule(t_to)
    return ddim_step(z, denoise(z, lf), lf, lt)


@pytest.mark.parametrize("teacher_steps,student_steps", [(8, 2), (8, 1), (6, 3), (4, 4)])
def test_one_student_step_onto_the_tract_target_lands_where_teacher_then_self_teacher_land(teacher_steps,
                                                                                             student_steps):
    teacher = GaussianMixture.random(k=5, shape=(2, 3, 3), seed=1)
    self_teacher = GaussianMixture.random(k=5, shape=(2, 3, 3), seed=2)  # an EMA of the student: another model
    g = torch.Generator().manual_seed(3)
    k = torch.arange(1, teacher_steps + 1).repeat_interleave(3)
    t = k.to(F64) / teacher_steps
    x, eps = teacher.sample(t.shape[0], g), torch.randn(t.shape[0], 2, 3, 3, generator=g, dtype=F64)
    z_t = diffuse(x, eps, logsnr_schedule(t))
    target = tract_target(teacher.denoise, self_teacher.denoise, z_t, t, teacher_steps, student_steps)
    span = teacher_steps // student_steps
    for row in range(t.shape[0]):
        kk = int(k[row])
        s = (kk - 1) // span * span / teacher_steps
        z, tt = z_t[row:row + 1], t[row:row + 1]
        t_next = torch.full_like(tt, (kk - 1) / teacher_steps)
        point, x_hat = _ddim(teacher.denoise, z, tt, t_next), teacher.denoise(z, logsnr_schedule(tt))  # one step
        if (kk - 1) / teacher_steps > s:  # then the self-teacher's jump to the segment's end
            x_hat = self_teacher.denoise(point, logsnr_schedule(t_next))
            point = _ddim(self_teacher.denoise, point, t_next, torch.full_like(tt, s))
        if s == 0:  # the last segment: a DDIM step to t = 0 returns x_hat, which is the target (as in PD)
            torch.testing.assert_close(target[row:row + 1], x_hat, rtol=0, atol=1e-9)
            continue
        landed = ddim_step(z, target[row:row + 1], logsnr_schedule(tt), logsnr_schedule(torch.full_like(tt, s)))
        assert (landed - point).abs().max().item() < 1e-6, (kk, s)


def test_tract_with_two_step_segments_and_no_self_teacher_is_progressive_distillation():
    gmm = GaussianMixture.random(k=4, shape=(1, 4, 4), seed=7)
    g = torch.Generator().manual_seed(0)
    n = 4  # the student's steps; the teacher's are 2n
    t = torch.arange(1, n + 1).repeat_interleave(4).to(F64) / n  # the student's grid
    z_t = diffuse(gmm.sample(t.shape[0], g), torch.randn(t.shape[0], 1, 4, 4, generator=g, dtype=F64),
                  logsnr_schedule(t))
    torch.testing.assert_close(tract_target(gmm.denoise, gmm.denoise, z_t, t, 2 * n, n),
                               distill_target(gmm.denoise, z_t, t, n), rtol=0, atol=1e-9)


def test_tract_target_refuses_segments_that_do_not_divide_the_teacher():
    z = torch.zeros(1, 1, 2, 2, dtype=F64)
    zero = lambda z, lam: torch.zeros_like(z)  # noqa: E731
    with pytest.raises(ValueError, match="must divide teacher_steps"):
        tract_target(zero, zero, z, torch.ones(1, dtype=F64), 8, 3)
    with pytest.raises(ValueError, match="not on the 8-step student grid"):
        tract_target(zero, zero, z, torch.full((1,), 0.3, dtype=F64), 8, 2)
