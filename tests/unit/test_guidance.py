"""Guided distillation's parts: the guided combination, the w input, label dropout, the settings refused up front,
the first stage from an exact class-conditional teacher, and the stages on a real network resumed bit for bit."""

from __future__ import annotations

import functools
import json
import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from raypd.checkpoint import load_checkpoint, meta_for, read_meta, save_checkpoint
from raypd.config import ConfigError, DistillConfig, load_config
from raypd.data import Batch
from raypd.data.prepare import training_shards
from raypd.diffusion import ddim_sample, logsnr_schedule
from raypd.models import Denoiser, build_denoiser
from raypd.models.guidance import GUIDANCE_FREQUENCIES, GuidedClassEmbedding, guidance_features
from raypd.methods import method_for, objective_for
from raypd.methods.guidance import FirstStage, Guidance
from raypd.methods.progressive import HalvingRound
from raypd.methods.regression import regression_loss
from raypd.train import build_plain_engine, denoising_loss, freeze, linear_decay, make_student, train_step
from raypd.train.engine import plain_engine
from raypd.train.objective import drop_labels
from raypd.train.runner import InProcessRunner
from raypd.train.stage import round_stage, teacher_stage
from tests.plans import plan_of
from tests.gmm import GaussianMixture
from tests.unit.test_stage_loop import interrupted_at

GUIDED = ["data.num_classes=10", "model.class_dropout=0.2"]
TINY = ["data.resolution=8", "model.attn_resolutions=[4]", "model.ch=32", "model.ch_mult=[1,2]",
        "teacher.batch_size=8", "teacher.warmup_updates=2", "distill.batch_size=8", "data.loader_workers=0",
        "run.device=cpu", "dist.checkpoint_every=4", *GUIDED, "distill.guidance_max=3", "distill.guidance_min=0.5",
        "distill.start_steps=8", "teacher.sampling_steps=8"]


class Scaling(nn.Module):
    """A backbone whose x-output is z * (label + 1): hand-computable."""

    def forward(self, z, logsnr, y=None):
        return z * (y.float() + 1)[:, None, None, None]


def test_the_guided_prediction_is_one_plus_w_conditional_minus_w_unconditional_by_hand():
    model = Denoiser(Scaling(), "x", null_class=10)
    z = torch.tensor([1.0, 2.0]).reshape(2, 1, 1, 1)
    y = torch.tensor([1, 4])
    logsnr = torch.zeros(2)
    # (1 + w) * z * (y + 1) - w * z * 11
    assert model.guided(z, logsnr, y, 2.0).flatten().tolist() == [3 * 2 - 2 * 11, 3 * 2 * 5 - 2 * 2 * 11]
    assert model.guided(z, logsnr, y, torch.tensor([0.0, 1.0])).flatten().tolist() == [2, 2 * 2 * 5 - 2 * 11]
    assert torch.equal(model.bind(y, 0.5)(z, logsnr), model.guided(z, logsnr, y, 0.5))
    with pytest.raises(ValueError, match="label dropout"):
        Denoiser(Scaling(), "x").guided(z, logsnr, y, 1.0)
    with pytest.raises(ValueError, match="class labels"):
        model.guided(z, logsnr, None, 1.0)


def test_guidance_at_w_zero_is_the_conditional_prediction_from_one_forward_of_the_batch():
    calls = []

    class Counting(Scaling):
        def forward(self, z, logsnr, y=None):
            calls.append(z.shape[0])
            return super().forward(z, logsnr, y)

    model = Denoiser(Counting(), "x", null_class=10)
    z, y, logsnr = torch.randn(3, 1, 2, 2), torch.tensor([0, 4, 9]), torch.zeros(3)
    assert torch.equal(model.guided(z, logsnr, y, 0.0), model(z, logsnr, y)) and calls == [3, 3]
    calls.clear()  # a tensor of weights, even all zero, takes both halves (no device sync to look at it)
    assert torch.equal(model.guided(z, logsnr, y, torch.zeros(3)), model(z, logsnr, y)) and calls == [6, 3]
    with pytest.raises(ValueError, match="label dropout"):
        Denoiser(Scaling(), "x").guided(z, logsnr, y, 0.0)


def test_the_w_input_is_fourier_features_through_a_zero_started_mlp_added_to_the_class_embedding():
    f = guidance_features(torch.tensor([0.0, 2.0]))
    assert f.shape == (2, 2 * GUIDANCE_FREQUENCIES)
    assert torch.allclose(f[0], torch.cat([torch.zeros(GUIDANCE_FREQUENCIES), torch.ones(GUIDANCE_FREQUENCIES)]))
    # w = 2 at the first frequency: angle pi/2; at the third (x2): pi
    assert math.isclose(f[1, 0].item(), 1.0, abs_tol=1e-6) and math.isclose(f[1, 2].item(), 0.0, abs_tol=1e-6)
    assert math.isclose(f[1, GUIDANCE_FREQUENCIES + 2].item(), -1.0, abs_tol=1e-6)

    torch.manual_seed(0)
    classes = nn.Embedding(11, 8)
    emb = GuidedClassEmbedding(classes)
    assert torch.equal(emb.weight, classes.weight)
    packed = torch.tensor([[3.0, 0.0], [7.0, 2.5]])
    assert torch.equal(emb(packed), classes.weight[[3, 7]])  # a zero last layer: the class embedding alone
    with torch.no_grad():
        emb.guidance[-1].weight.normal_()
    lin1, lin2 = emb.guidance[0], emb.guidance[2]
    by_hand = classes.weight[[3, 7]] + lin2(torch.nn.functional.silu(lin1(guidance_features(packed[:, 1]))))
    assert torch.allclose(emb(packed), by_hand)


def test_a_student_made_w_conditioned_starts_as_the_teacher_and_its_checkpoint_says_so(tmp_path):
    cfg = load_config(None, TINY)
    torch.manual_seed(0)
    teacher = freeze(build_denoiser(cfg.model, cfg.data))
    assert teacher.null_class == 10 and teacher.backbone.unet.class_embedding.num_embeddings == 11
    with torch.no_grad():  # a teacher whose output depends on everything
        for p in teacher.parameters():
            p.add_(0.01 * torch.randn_like(p))
    student = make_student(teacher, guidance_input=True)
    assert student.guidance_input and not teacher.guidance_input
    z, y, logsnr = torch.randn(3, 1, 8, 8), torch.tensor([0, 5, 9]), torch.tensor([-3.0, 0.0, 4.0])
    with torch.no_grad():
        for w in (0.0, 2.0):
            assert torch.allclose(student(z, logsnr, y, torch.full((3,), w)), teacher(z, logsnr, y), atol=1e-6)
        student.backbone.unet.class_embedding.guidance[-1].weight.normal_()
        w_apart = student(z, logsnr, y, torch.full((3,), 3.0)) - student(z, logsnr, y, torch.zeros(3))
    assert w_apart.abs().max() > 1e-3  # once trained, w moves the output
    with pytest.raises(ValueError, match="w-conditioned"):
        student(z, logsnr, y)
    with pytest.raises(ValueError, match="not w-conditioned"):
        teacher(z, logsnr, y, torch.zeros(3))

    path = save_checkpoint(tmp_path / "student", student, meta_for(cfg, kind="student", sampling_steps=8, round=0,
                                                                      guidance_input=True))
    assert json.loads((path / "meta.json").read_text())["guidance_input"] is True
    loaded, meta = load_checkpoint(path)
    assert meta.guidance_input and loaded.guidance_input and loaded.null_class == 10
    with torch.no_grad():
        assert torch.equal(freeze(loaded)(z, logsnr, y, torch.ones(3)), freeze(student)(z, logsnr, y, torch.ones(3)))
    teacher_path = save_checkpoint(tmp_path / "teacher", teacher, meta_for(cfg, kind="teacher", sampling_steps=8,
                                                                              round=None))
    assert "guidance_input" not in json.loads((teacher_path / "meta.json").read_text())
    assert not read_meta(teacher_path).guidance_input

    # a student saved when w had 16 Fourier frequencies loads with them and samples as it did
    embedding = student.backbone.unet.class_embedding
    embedding.guidance[0] = nn.Linear(32, embedding.embedding_dim)
    assert embedding.frequencies == 16 != GUIDANCE_FREQUENCIES
    old = save_checkpoint(tmp_path / "old", student, meta_for(cfg, kind="student", sampling_steps=8, round=0,
                                                               guidance_input=True))
    loaded = load_checkpoint(old)[0]
    assert loaded.backbone.unet.class_embedding.frequencies == 16
    with torch.no_grad():
        assert torch.equal(freeze(loaded)(z, logsnr, y, torch.ones(3)), freeze(student)(z, logsnr, y, torch.ones(3)))


def test_label_dropout_replaces_that_share_of_labels_by_the_no_class_label():
    y = torch.randint(0, 10, (20_000,), generator=torch.Generator().manual_seed(0))
    dropped = drop_labels(y, 0.2, 10, torch.Generator().manual_seed(1))
    share = (dropped == 10).float().mean().item()
    assert abs(share - 0.2) < 0.01
    kept = dropped != 10
    assert torch.equal(dropped[kept], y[kept])

    cfg = load_config(None, TINY)
    model = build_denoiser(cfg.model, cfg.data)
    seen = []
    original = model.forward

    def spy(z, logsnr, y=None, w=None):
        seen.append(y.clone())
        return original(z, logsnr, y)

    model.forward = spy
    batch = Batch(torch.zeros(512, 1, 8, 8), torch.zeros(512, dtype=torch.long))
    denoising_loss(model, batch, weighting="snr_trunc", logsnr_fn=logsnr_schedule, class_dropout=0.2, null=10,
                   generator=torch.Generator().manual_seed(2))
    assert set(seen[0].tolist()) == {0, 10} and 0.1 < (seen[0] == 10).float().mean().item() < 0.3
    with pytest.raises(ValueError, match="null_class"):
        denoising_loss(model, batch, weighting="snr_trunc", logsnr_fn=logsnr_schedule, class_dropout=0.2)


def test_guidance_settings_are_checked_up_front():
    for overrides, key in ((["distill.guidance_max=2"], "distill.guidance_max"),
                           (["data.num_classes=10", "distill.guidance_max=2"], "distill.guidance_max"),
                           (["model.class_dropout=0.1"], "model.class_dropout"),
                           (["model.class_dropout=1.0", "data.num_classes=10"], "model.class_dropout"),
                           ([*GUIDED, "distill.guidance_min=3", "distill.guidance_max=2"], "distill.guidance_min"),
                           ([*GUIDED, "distill.guidance_max=2", "distill.method=denoising_student"],
                            "distill.guidance_max"),
                           ([*GUIDED, "distill.guidance_max=2", "distill.guidance_updates=0"],
                            "distill.guidance_updates"),
                           ([*GUIDED, "distill.guidance_max=2", "distill.guidance_lr=0"], "distill.guidance_lr"),
                           ([*GUIDED, "distill.guidance_max=2", "distill.guidance_embedding_lr_factor=0"],
                            "distill.guidance_embedding_lr_factor"),
                           ([*GUIDED, "distill.guidance_max=2", "distill.guidance_endpoints=1.5"],
                            "distill.guidance_endpoints"),
                           ([*GUIDED, "distill.guidance_max=2", "distill.guidance_endpoints=-0.1"],
                            "distill.guidance_endpoints"),
                           ([*GUIDED, "distill.guidance_max=2", "distill.guidance_loss_power=-1"],
                            "distill.guidance_loss_power"),
                           (["eval.guidance=[1.0]"], "eval.guidance"),
                           ([*GUIDED, "eval.guidance=[1.0]"], "eval.guidance"),  # unguided students
                           ([*GUIDED, "distill.guidance_max=2", "eval.guidance=[1.0,3.0]"], "eval.guidance"),
                           ([*GUIDED, "eval.guidance=[-1.0]"], "eval.guidance"),
                           ([*GUIDED, "eval.guidance=[1.0,1.0]"], "eval.guidance")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            method_for(load_config(None, overrides))
    assert load_config(None, [*GUIDED, "distill.guidance_max=2", "eval.guidance=[2,0,1]"]).guidance_weights() == \
        [0.0, 1.0, 2.0]
    assert load_config(None, [*GUIDED, "distill.guidance_min=1", "distill.guidance_max=3"]).guidance_weights() == \
        [1.0, 2.0, 3.0]
    assert load_config(None, GUIDED).guidance_weights() == [None]

    # a given teacher fits when both or neither have the "no class" label, whatever the dropout rate
    from raypd.checkpoint import CheckpointError, check_compatible

    meta = meta_for(load_config(None, GUIDED), kind="teacher", sampling_steps=8, round=None)
    check_compatible(meta, load_config(None, ["data.num_classes=10", "model.class_dropout=0.1"]), "t")
    with pytest.raises(CheckpointError, match="no class"):
        check_compatible(meta, load_config(None, ["data.num_classes=10"]), "t")

    rounds = plan_of(DistillConfig(start_steps=8, end_steps=2, guidance_max=2.0, guidance_updates=50,
                                   updates_per_round=200, late_rounds_factor=2.0))
    assert [(r.teacher_steps, r.student_steps, r.updates, r.phase) for r in rounds] == \
        [(8, 8, 50, "guidance"), (8, 4, 200, ""), (4, 2, 400, "")]


@pytest.mark.parametrize("endpoints", [0.0, 0.5, 1.0])
def test_w_draws_put_their_endpoints_share_at_the_ends_half_each_and_the_rest_uniform(endpoints):
    g = torch.Generator().manual_seed(0)
    w = Guidance(0.5, 3.0, endpoints=endpoints).draw(40_000, g, "cpu")
    low, high = (w == 0.5).float().mean().item(), (w == 3.0).float().mean().item()
    assert low == pytest.approx(endpoints / 2, abs=0.01) and high == pytest.approx(endpoints / 2, abs=0.01)
    inside = w[(w > 0.5) & (w < 3.0)]
    assert inside.numel() == pytest.approx(40_000 * (1 - endpoints), abs=400)
    if inside.numel():  # uniform in between: each quarter of the range holds a quarter of them
        counts = torch.histc(inside, bins=4, min=0.5, max=3.0) / inside.numel()
        assert torch.allclose(counts, torch.full((4,), 0.25), atol=0.02), counts
    again = Guidance(0.5, 3.0, endpoints=endpoints).draw(40_000, torch.Generator().manual_seed(0), "cpu")
    assert torch.equal(w, again)  # the step's generator alone decides them (a resumed stage draws the same)
    cfg = load_config(None, [*GUIDED, "distill.guidance_max=3", f"distill.guidance_endpoints={endpoints}"])
    assert Guidance.of(cfg.distill).endpoints == endpoints  # one draw for the first stage and the rounds


def test_the_first_stage_scales_each_examples_loss_by_one_plus_w_to_the_minus_power_and_the_rounds_do_not():
    w = torch.tensor([0.0, 1.0, 3.0])
    assert Guidance(0.0, 3.0, loss_power=2.0).loss_weight(w).tolist() == [1.0, 0.25, 1 / 16]
    assert Guidance(0.0, 3.0, loss_power=0.5).loss_weight(w).tolist() == pytest.approx([1.0, 2 ** -0.5, 0.5])
    assert Guidance(0.0, 3.0).loss_weight(w) is None
    cfg = load_config(None, [*GUIDED, "distill.guidance_max=3", "distill.guidance_loss_power=1.5"])
    assert Guidance.of(cfg.distill).loss_power == 1.5

    # in the step's loss: every draw at w = 1 (both ends of the range there), so the scaled loss is the
    # unscaled one, at the same noise, times 2^-p
    mixture = ClassMixture()
    teacher, student, round_teacher = ExactGuidedTeacher(mixture), Denoiser(WMLP(), "v"), Denoiser(WMLP(), "v")
    batch = mixture.sample(64, torch.Generator().manual_seed(0))

    def loss(p, first_stage=True):
        g = torch.Generator().manual_seed(1)
        kind = FirstStage if first_stage else HalvingRound  # a round's teacher: w-conditioned
        nets = {"student": student, "teacher": teacher if first_stage else round_teacher}
        return regression_loss(kind, nets, batch, student_steps=4, weighting="snr_trunc", logsnr_fn=logsnr_schedule,
                               generator=g, guidance=Guidance(1.0, 1.0, loss_power=p)).item()

    assert loss(0.0) > 0
    assert loss(2.0) == pytest.approx(loss(0.0) / 4, rel=1e-6)
    assert loss(3.0) == pytest.approx(loss(0.0) / 8, rel=1e-6)
    assert loss(2.0, first_stage=False) == loss(0.0, first_stage=False)


def test_a_sweep_of_the_first_stage_sweeps_its_own_learning_rate_and_does_not_centre_the_rounds_on_it():
    from raypd.distributed.sweep import SweepRunner, search_space, trial_config

    cfg = load_config(None, [*GUIDED, "distill.guidance_max=2", "distill.guidance_lr=5e-5", "distill.lr=3e-4",
                             "sweep.lr_min=1e-5", "sweep.lr_max=1e-2"])
    method = method_for(cfg)
    assert search_space(cfg, 10, None, stage_lr=method.stage_lr("guidance"))[1]["lr"] == 5e-5
    assert search_space(cfg, 10, None, stage_lr=method.stage_lr(""))[1]["lr"] == 3e-4
    first = trial_config(cfg.to_dict(), {"lr": 2e-5, "updates": 10}, lr_key=method.lr_key("guidance"))
    assert (first.distill.guidance_lr, first.distill.lr) == (2e-5, 3e-4)
    later = trial_config(cfg.to_dict(), {"lr": 2e-3, "updates": 10}, lr_key=method.lr_key(""))
    assert (later.distill.guidance_lr, later.distill.lr) == (5e-5, 2e-3)
    runner = SweepRunner.__new__(SweepRunner)
    runner.centre, runner.choices = None, []
    chosen = {"sweep_report": "r.md", "lr": 2e-5, "updates": 10, "sweep_trials": 2, "sweep_reason": "lowest FID"}
    runner.chose(0, 8, 8, chosen, phase="guidance")
    assert runner.centre is None and len(runner.choices) == 1
    runner.chose(1, 8, 4, {**chosen, "lr": 2e-3})
    assert runner.centre == {"lr": 2e-3, "updates": 10}


class ClassMixture:
    """Two classes, each a Gaussian mixture; the unconditional model is the equal-weight mixture of both."""

    def __init__(self):
        both = GaussianMixture.random(k=4, shape=(2, 1, 1), std=0.08, seed=3, dtype=torch.float32)
        self.classes = [GaussianMixture(both.means[:2], both.std, both.shape),
                        GaussianMixture(both.means[2:], both.std, both.shape)]
        self.all = both

    def sample(self, n: int, g: torch.Generator) -> Batch:
        y = torch.randint(0, 2, (n,), generator=g)
        k = 2 * y + torch.randint(0, 2, (n,), generator=g)  # classes 0 and 1 own components {0, 1} and {2, 3}
        noise = torch.randn(n, self.all.means.shape[1], generator=g)
        return Batch((self.all.means[k] + self.all.std * noise).reshape(n, *self.all.shape), y)


class ExactGuidedTeacher(nn.Module):
    """The mixture's exact conditional E[x | z, c] and unconditional E[x | z] (label 2) as a guided Denoiser."""

    def __init__(self, mixture: ClassMixture):
        super().__init__()
        self.mixture = mixture
        self.null_class, self.guidance_input = 2, False

    def forward(self, z, logsnr, y=None, w=None):
        out = self.mixture.all.denoise(z, logsnr)
        for c, gmm in enumerate(self.mixture.classes):
            mask = y == c
            if mask.any():
                out[mask] = gmm.denoise(z[mask], logsnr[mask])
        return out

    guided = Denoiser.guided


class WMLP(nn.Module):
    """A small w- and class-conditioned backbone."""

    guidance_input = True

    def __init__(self, hidden: int = 192):
        super().__init__()
        self.register_buffer("freqs", 2.0 ** torch.arange(8) / 16.0)
        self.label = nn.Embedding(2, 16)
        self.net = nn.Sequential(nn.Linear(2 + 16 + 16 + 2 * GUIDANCE_FREQUENCIES, hidden), nn.SiLU(),
                                 nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, 2))

    def forward(self, z, logsnr, y=None, w=None):
        ang = logsnr[:, None] * self.freqs[None]
        h = torch.cat([z.flatten(1), ang.sin(), ang.cos(), self.label(y), guidance_features(w / 4)], dim=1)
        return self.net(h).reshape(z.shape)


def test_the_first_stage_from_an_exact_guided_teacher_reaches_the_guided_target():
    """A w-conditioned student trained on the exact teacher's guided x_hat over w in [0, 4] predicts it, and its
    64-step DDIM samples at w land near the teacher's guided samples at that w (and far from the unguided ones)."""
    torch.manual_seed(0)
    mixture = ClassMixture()
    teacher = ExactGuidedTeacher(mixture)
    logsnr_fn = functools.partial(logsnr_schedule)
    student = Denoiser(WMLP(), "v").train()  # v: near t = 0, where the weighting is largest, x_hat ~ z for free
    updates = 1500
    engine = build_plain_engine(student, lr=2e-3, betas=(0.9, 0.999), grad_clip=1.0, schedule=linear_decay(updates))
    data_gen, noise_gen = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    guidance, nets = Guidance(0.0, 4.0), {"student": engine.model, "teacher": teacher}
    losses = [train_step(engine, regression_loss(FirstStage, nets, mixture.sample(256, data_gen), student_steps=64,
                                                 weighting="snr_trunc", logsnr_fn=logsnr_fn, generator=noise_gen,
                                                 guidance=guidance)).loss for _ in range(updates)]
    assert sum(losses[-50:]) < 0.1 * sum(losses[:50])
    student = freeze(student)

    g = torch.Generator().manual_seed(9)
    z_1 = torch.randn(512, 2, 1, 1, generator=g)
    y = torch.randint(0, 2, (512,), generator=g)
    with torch.no_grad():
        for w in (1.0, 3.0):
            guided = ddim_sample(lambda z, logsnr, w=w: teacher.guided(z, logsnr, y, w), z_1, 64)
            plain = ddim_sample(lambda z, logsnr: teacher(z, logsnr, y), z_1, 64)
            ours = ddim_sample(student.bind(y, w), z_1, 64)
            err = (ours - guided).square().mean().sqrt().item()
            apart = (plain - guided).square().mean().sqrt().item()
            assert err < 0.25 * apart, (w, err, apart)  # measured: 0.12x at w = 1, 0.06x at w = 3


def _run(cfg, root, stage):
    InProcessRunner(cfg, root / "local", torch.device("cpu"),
                    objectives=lambda stage: objective_for(cfg, stage)).run(stage, root / "out" / stage.name)
    return root / "out" / stage.name


@pytest.fixture(scope="module")
def guided_stages(tmp_path_factory):
    """A guided teacher (label dropout), its w-conditioned student (the first stage) and one round after it."""
    root = tmp_path_factory.mktemp("guided")
    cfg = load_config(None, [*TINY, "data.source=digits", "distill.guidance_updates=8", "distill.updates_per_round=8",
                             "distill.guidance_loss_power=2"])
    shards = training_shards(cfg.data, root / "data", seed=cfg.run.seed)
    teacher = _run(cfg, root, teacher_stage(8, 8, shards))
    first, second = method_for(cfg).plan()[:2]
    student = _run(cfg, root, round_stage(first, teacher, shards))
    return cfg, root, shards, teacher, student, second


def test_the_guided_stages_train_a_w_conditioned_student_and_distil_it(guided_stages):
    cfg, root, shards, teacher_path, student_path, second = guided_stages
    teacher, teacher_meta = load_checkpoint(teacher_path)
    student, student_meta = load_checkpoint(student_path)
    assert not teacher_meta.guidance_input and student_meta.guidance_input and student_meta.sampling_steps == 8
    guidance = student.backbone.unet.class_embedding.guidance
    assert guidance[-1].weight.abs().max() > 0  # the w embedding learned
    z, y, logsnr = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3]), torch.zeros(4)
    with torch.no_grad():
        apart = (student(z, logsnr, y, torch.full((4,), 3.0)) - student(z, logsnr, y, torch.full((4,), 0.5)))
    assert apart.abs().max() > 0
    rnd = _run(cfg, root, round_stage(second, student_path, shards))
    meta = read_meta(rnd)
    assert meta.guidance_input and meta.sampling_steps == second.student_steps == 4


def test_the_first_stage_trains_at_its_own_rate_with_the_w_embedding_faster_and_the_rounds_at_theirs(
        guided_stages):
    cfg, root, shards, teacher_path, student_path, second = guided_stages
    cfg = load_config(None, [*TINY, "distill.guidance_lr=2e-4", "distill.guidance_embedding_lr_factor=5",
                             "distill.lr=1e-3"])
    first = round_stage(method_for(cfg).plan()[0], teacher_path, shards)
    setup = objective_for(cfg, first).setup(torch.device("cpu"))
    engine = plain_engine(setup.roles["student"], setup.batch_size)
    network, embedding = engine.optimizer.param_groups
    assert all(".guidance." not in n for n, p in engine.model.named_parameters()
               if any(p is q for q in network["params"]))
    names = {n for n, p in engine.model.named_parameters() if any(p is q for q in embedding["params"])}
    assert names and all(".class_embedding.guidance." in n for n in names)
    assert (network["lr"], embedding["lr"]) == (pytest.approx(2e-4), pytest.approx(1e-3))
    before = {n: p.detach().clone() for n, p in engine.model.named_parameters()}
    batch = next(iter(training_loader_of(cfg, shards)))
    nets = {"student": engine.model, "teacher": load_checkpoint(teacher_path)[0]}
    train_step(engine, regression_loss(FirstStage, nets, batch, student_steps=first.student_steps,
                                       weighting="snr_trunc", logsnr_fn=logsnr_schedule,
                                       generator=torch.Generator().manual_seed(0), guidance=Guidance(0.5, 3.0)))
    moved = {n: (p.detach() - before[n]).abs().max().item() for n, p in engine.model.named_parameters()}
    assert max(moved[n] for n in names) > 0 and max(v for n, v in moved.items() if n not in names) > 0
    # the schedule scales both groups alike: halfway through the stage each is at half its rate
    engine.updates = first.updates // 2
    engine.set_lr()
    assert embedding["lr"] == pytest.approx(5 * network["lr"]) and network["lr"] == pytest.approx(1e-4)
    # a round after it: both groups at distill.lr
    later_setup = objective_for(cfg, round_stage(second, student_path, shards)).setup(torch.device("cpu"))
    later = plain_engine(later_setup.roles["student"], later_setup.batch_size)
    assert [g["lr"] for g in later.optimizer.param_groups] == [pytest.approx(1e-3)] * 2


def training_loader_of(cfg, shards):
    from raypd.data.shards import training_loader

    return training_loader(list(shards), cfg.data, batch_size=cfg.distill.batch_size, seed=0, stream=1)


def test_a_guided_stage_interrupted_resumes_bit_for_bit(guided_stages, tmp_path, monkeypatch, capsys):
    cfg, root, shards, teacher_path, _, _ = guided_stages
    stage = round_stage(method_for(cfg).plan()[0], teacher_path, shards)
    through = load_file(str(_run(cfg, tmp_path / "through", stage) / "model.safetensors"))
    interrupted_at(monkeypatch, 6, lambda: _run(cfg, tmp_path / "again", stage))
    resumed = load_file(str(_run(cfg, tmp_path / "again", stage) / "model.safetensors"))
    assert "resumed from the checkpoint at update 4 of 8" in capsys.readouterr().err
    assert sorted(resumed) == sorted(through) and any("guidance" in k for k in through)
    assert all(torch.equal(resumed[k], through[k]) for k in through)


def test_a_w_conditioned_student_exports_as_a_pipeline_taking_class_labels_and_guidance_scale(tmp_path):
    """The export holds a stock UNet2DModel (class conditioning taken as given) and a guidance component that
    embeds (label, w); its samples at guidance_scale = 1 + w are raypd's at w, from the same noise."""
    from diffusers import UNet2DModel

    from raypd.hf.export import export_student, load_pipeline, pipeline_samples, raypd_samples

    cfg = load_config(None, TINY)
    torch.manual_seed(0)
    student = make_student(build_denoiser(cfg.model, cfg.data), guidance_input=True)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.02 * torch.randn_like(p))
    path = save_checkpoint(tmp_path / "student", student,
                           meta_for(cfg, kind="student", sampling_steps=2, round=3, guidance_input=True))
    out, match = export_student(path, tmp_path / "pipe")
    assert match is not None and match <= 1e-4
    index = json.loads((out / "model_index.json").read_text())
    assert index["guidance"] == ["raypd_guidance", "GuidanceEmbedding"] and (out / "guidance" / "raypd_guidance.py").is_file()
    assert UNet2DModel.from_pretrained(str(out / "unet")).config.class_embed_type == "identity"
    assert "guidance_scale=" in (out / "README.md").read_text()

    pipe = load_pipeline(out)
    pipe.set_progress_bar_config(disable=True)
    model, meta = load_checkpoint(path)
    samples = {}
    for w in (0.5, 3.0):
        ours, labels = raypd_samples(model, meta, 3, seed=4, steps=2, clip=True, w=w)
        theirs = pipeline_samples(pipe, 3, seed=4, labels=labels, steps=2, w=w)
        assert (theirs - ours).abs().max() <= 1e-4, w
        samples[w] = theirs
    assert (samples[0.5] - samples[3.0]).abs().max() > 1e-3  # the weight reaches the network
    with pytest.raises(ValueError, match="guidance_scale"):
        pipe(class_labels=[1, 2], num_inference_steps=2, output_type="pt")


def test_tract_phases_distil_the_w_conditioned_student_at_its_own_w(guided_stages, tmp_path):
    """Stage two by TRACT: the self-teacher is an average of the w-conditioned student, both stepping at w."""
    from dataclasses import replace

    cfg, _, shards, _, student_path, _ = guided_stages
    tract = replace(cfg, distill=replace(cfg.distill, method="tract", options={"tract": {"phases": [2, 1]}}))
    rounds = method_for(tract).plan()
    assert [(r.teacher_steps, r.student_steps, r.phase) for r in rounds] == [(8, 8, "guidance"), (8, 2, ""),
                                                                             (2, 1, "")]
    phase = _run(tract, tmp_path, round_stage(rounds[1], student_path, shards))
    meta = read_meta(phase)
    assert meta.guidance_input and meta.sampling_steps == 2
    saved = next((tmp_path / "local").rglob("self_teacher.safetensors"))
    assert any("class_embedding.guidance" in k for k in load_file(str(saved)))


def test_an_imported_diffusers_teacher_may_carry_the_no_class_label():
    from raypd.models.imported import UnsupportedModelError, check_unet_config

    config = {"_class_name": "UNet2DModel", "in_channels": 1, "out_channels": 1, "sample_size": 8,
              "num_class_embeds": 11}
    check_unet_config(config, channels=1, resolution=8, num_classes=10, null_class=True)
    with pytest.raises(UnsupportedModelError, match="'no class' label"):
        check_unet_config({**config, "num_class_embeds": 10}, channels=1, resolution=8, num_classes=10,
                          null_class=True)
    with pytest.raises(UnsupportedModelError, match="num_class_embeds"):
        check_unet_config(config, channels=1, resolution=8, num_classes=10)
