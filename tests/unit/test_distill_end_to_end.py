"""Distillation works end to end in plain PyTorch, from an analytic (exact) teacher.

A small MLP student is distilled over three halving rounds (8 -> 4 -> 2 -> 1 steps) from the
exact denoiser of a Gaussian mixture; its 1- and 2-step samples must land much closer to the
teacher's many-step samples than the teacher's own DDIM at 1 and 2 steps does. The first
student starts from scratch (an analytic teacher has no weights to copy), so the first round
gets a larger budget; later students start from their teacher, as in the paper.
"""

import functools

import torch
from torch import nn

from raypd.config import DistillConfig
from raypd.data import Batch
from raypd.diffusion import ddim_sample, logsnr_schedule
from raypd.models import Denoiser
from raypd.methods.progressive import HalvingRound
from raypd.methods.regression import regression_loss
from raypd.train import build_plain_engine, freeze, linear_decay, make_student, train_step
from tests.plans import plan_of
from tests.gmm import GaussianMixture


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int = 128, freqs: int = 8):
        super().__init__()
        self.register_buffer("freqs", 2.0 ** torch.arange(freqs) / 16.0)
        self.net = nn.Sequential(nn.Linear(dim + 2 * freqs, hidden), nn.SiLU(), nn.Linear(hidden, hidden),
                                 nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, dim))

    def forward(self, z, logsnr, y=None):
        ang = logsnr[:, None] * self.freqs[None]
        h = torch.cat([z.flatten(1), ang.sin(), ang.cos()], dim=1)
        return self.net(h).reshape(z.shape)


class AnalyticTeacher(nn.Module):
    """The Gaussian mixture's exact denoiser behind the Denoiser interface."""

    def __init__(self, gmm):
        super().__init__()
        self.gmm = gmm

    def forward(self, z, logsnr, y=None):
        return self.gmm.denoise(z, logsnr)

    def bind(self, y):
        return self.forward


def test_distilled_students_beat_teacher_ddim_at_one_and_two_steps():
    torch.manual_seed(0)
    gmm = GaussianMixture.random(k=4, shape=(2, 1, 1), std=0.05, seed=3, dtype=torch.float32)
    logsnr_fn = functools.partial(logsnr_schedule)
    rounds = plan_of(DistillConfig(start_steps=8, end_steps=1, updates_per_round=300, late_rounds_factor=1.0))
    assert [(r.teacher_steps, r.student_steps, r.updates) for r in rounds] == [(8, 4, 300), (4, 2, 300), (2, 1, 300)]

    teacher: nn.Module = AnalyticTeacher(gmm)
    first_student = Denoiser(MLP(2), "x")
    data_gen = torch.Generator().manual_seed(1)
    noise_gen = torch.Generator().manual_seed(2)
    students = {}
    for rnd in rounds:
        student = make_student(teacher) if isinstance(teacher, Denoiser) else first_student.train()
        updates = 1000 if rnd.index == 0 else rnd.updates
        engine = build_plain_engine(student, lr=2e-3, betas=(0.9, 0.999), grad_clip=1.0,
                                    schedule=linear_decay(updates))
        losses = []
        for _ in range(updates):
            loss = regression_loss(HalvingRound, {"student": engine.model, "teacher": teacher},
                                   Batch(gmm.sample(256, data_gen)), student_steps=rnd.student_steps,
                                   weighting="snr_trunc", logsnr_fn=logsnr_fn, generator=noise_gen)
            stats = train_step(engine, loss)
            losses.append(stats.loss)
        assert sum(losses[-50:]) < sum(losses[:50]), f"round {rnd.index} did not learn"
        teacher = students[rnd.student_steps] = freeze(student)

    z_1 = torch.randn(1024, 2, 1, 1, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        reference = ddim_sample(gmm.denoise, z_1, 256)
        for n, max_ratio in ((1, 0.4), (2, 0.6)):
            ddim = ddim_sample(gmm.denoise, z_1, n)
            student = ddim_sample(students[n].bind(None), z_1, n)
            ddim_err = (ddim - reference).square().mean().sqrt().item()
            student_err = (student - reference).square().mean().sqrt().item()
            assert student_err < max_ratio * ddim_err, (n, student_err, ddim_err)
