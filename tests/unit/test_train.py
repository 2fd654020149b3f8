import math

import pytest
import torch

from raypd.config import DistillConfig, load_config
from raypd.data import Batch
from raypd.diffusion import logsnr_schedule
from raypd.models import Denoiser, build_denoiser
from raypd.methods.progressive import HalvingRound
from raypd.methods.regression import regression_loss
from raypd.train import EMA, build_plain_engine, denoising_loss, freeze, linear_decay, make_student, train_step, warmup

from tests.plans import plan_of
from tests.teachers import perturbed_denoiser

TINY = ["model.ch=32", "model.ch_mult=[1,2]", "data.resolution=8", "model.attn_resolutions=[4]", "model.dropout=0.2"]


def test_lr_schedules():
    w = warmup(4)
    assert [w(k) for k in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    d = linear_decay(4)
    assert [d(k) for k in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert warmup(0)(0) == 1.0
    with pytest.raises(ValueError):
        linear_decay(0)


@pytest.mark.parametrize("decay", ["constant", "linear"])
def test_the_teacher_s_learning_rate_follows_teacher_lr_decay(decay):
    from raypd.config import load_config
    from raypd.train.objective import TeacherTraining

    cfg = load_config(None, ["teacher.updates=10", "teacher.warmup_updates=2", f"teacher.lr_decay={decay}",
                             "data.resolution=8", "model.attn_resolutions=[4]"])
    role = TeacherTraining(cfg).setup(torch.device("cpu")).roles["teacher"]
    multipliers = [round(role.schedule(k), 3) for k in (0, 1, 2, 6, 9)]
    assert multipliers == ([0.5, 1.0, 1.0, 1.0, 1.0] if decay == "constant" else [0.5, 1.0, 1.0, 0.5, 0.125])


def test_plan_rounds_paper_schedule():
    rounds = plan_of(DistillConfig(start_steps=8192, end_steps=1, updates_per_round=50_000, late_rounds_factor=2.0))
    assert len(rounds) == 13
    assert [r.student_steps for r in rounds] == [4096 // 2**k for k in range(13)]
    assert [r.updates for r in rounds[-3:]] == [50_000, 100_000, 100_000]
    assert all(r.teacher_steps == 2 * r.student_steps for r in rounds)
    short = plan_of(DistillConfig(start_steps=16, end_steps=4, updates_per_round=10))
    assert [(r.teacher_steps, r.student_steps, r.updates) for r in short] == [(16, 8, 10), (8, 4, 10)]


def test_ema_matches_its_formula():
    lin = torch.nn.Linear(3, 1)
    ema = EMA(lin, 0.9)
    start = lin.weight.detach().clone()
    with torch.no_grad():
        lin.weight.add_(1.0)
    ema.update(lin)
    torch.testing.assert_close(ema.shadow.weight, start + 0.1)
    assert not ema.shadow.weight.requires_grad


def test_student_is_a_trainable_dropout_free_copy_and_teacher_is_frozen():
    cfg = load_config(None, TINY)
    teacher = freeze(build_denoiser(cfg.model, cfg.data))
    student = make_student(teacher)
    assert student.training and all(p.requires_grad for p in student.parameters())
    assert all(m.p == 0.0 for m in student.modules() if isinstance(m, torch.nn.Dropout))
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert any(m.p == 0.2 for m in teacher.modules() if isinstance(m, torch.nn.Dropout))
    assert all(torch.equal(a, b) for a, b in zip(teacher.state_dict().values(), student.state_dict().values()))


def test_teacher_training_and_distillation_share_one_update():
    cfg = load_config(None, TINY)
    x = torch.rand(8, 1, 8, 8) * 2 - 1
    student = perturbed_denoiser(cfg).train()
    teacher = freeze(perturbed_denoiser(cfg))
    kw = dict(weighting="snr_trunc", logsnr_fn=logsnr_schedule)
    nets = {"student": student, "teacher": teacher}
    plain = denoising_loss(student, Batch(x), generator=torch.Generator().manual_seed(0), **kw)
    distill = regression_loss(HalvingRound, nets, Batch(x), student_steps=4, generator=torch.Generator().manual_seed(0),
                              **kw)
    assert plain.requires_grad and distill.requires_grad and plain.item() != distill.item()
    assert not any(p.grad is not None for p in teacher.parameters())
    engine = build_plain_engine(student, lr=1e-3, betas=(0.9, 0.999), grad_clip=1.0, schedule=linear_decay(10))
    before = [p.detach().clone() for p in student.parameters()]
    stats = train_step(engine, regression_loss(HalvingRound, nets, Batch(x), student_steps=4,
                                               generator=torch.Generator().manual_seed(1), **kw))
    assert math.isfinite(stats.loss) and stats.lr == 1e-3 and engine.updates == 1
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))
    assert engine.optimizer.param_groups[0]["lr"] == pytest.approx(0.9e-3)


def test_engine_skips_non_finite_updates_and_clips():
    class Pixel(torch.nn.Conv2d):
        def forward(self, z, logsnr=None, y=None):
            return super().forward(z)

    backbone = Pixel(1, 1, 1)
    lin = Denoiser(backbone, "x")
    engine = build_plain_engine(lin, lr=0.1, betas=(0.9, 0.999), grad_clip=1.0, schedule=warmup(0), ema_decay=0.5)
    before = backbone.weight.detach().clone()
    engine.backward((backbone(torch.ones(1, 1, 1, 1)) * float("nan")).sum())
    grad_norm, _ = engine.step()
    assert math.isnan(grad_norm) and engine.skipped_updates == 1
    assert torch.equal(backbone.weight, before)
    engine.backward((backbone(torch.ones(1, 1, 1, 1)) * 1000).sum())
    grad_norm, _ = engine.step()
    assert grad_norm > 1.0 and engine.skipped_updates == 1
    assert (backbone.weight - before).abs().max() <= 0.1 + 1e-6  # Adam's first step moves each weight by ~lr


def test_ema_of_a_bf16_model_averages_in_fp32():
    from raypd.train.ema import EMA

    model = torch.nn.Linear(4, 4).to(torch.bfloat16)
    ema = EMA(model, decay=0.9999)
    start = ema.shadow.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(0.01)
    for _ in range(100):
        ema.update(model)
    moved = (ema.shadow.weight - start).mean().item()
    assert ema.shadow.weight.dtype == torch.float32
    assert moved == pytest.approx(0.01 * (1 - 0.9999**100), rel=0.05)  # bf16 arithmetic would move ~3x less


def test_ema_converts_a_chunk_at_a_time_and_averages_the_same():
    from raypd.train.ema import EMA

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(5)]).to(torch.bfloat16)
    whole, chunked = EMA(model, decay=0.9), EMA(model, decay=0.9)
    chunked.CHUNK = 100  # smaller than one weight matrix plus its bias: several chunks per update
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    for _ in range(3):
        whole.update(model)
        chunked.update(model)
    for a, b in zip(whole.shadow.parameters(), chunked.shadow.parameters()):
        assert torch.equal(a, b)
