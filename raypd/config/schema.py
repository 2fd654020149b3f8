"""The run configuration's schema: typed, frozen sections, each field documented by the string under it.

``python -m raypd.distill --help-config`` prints those documents. The defaults are the local
single-node test mode: a small UNet on scikit-learn's bundled handwritten digits, on CPU, finishing
in minutes.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from raypd.diffusion.loss import Weighting
from raypd.diffusion.params import Parameterization
from raypd.diffusion.schedule import Schedule


class ConfigError(ValueError):
    """A bad configuration value; the message starts with the key's full dotted path."""

    def __init__(self, key: str, reason: str):
        super().__init__(f"{key}: {reason}" if key else reason)
        self.key, self.reason = key, reason

    def __reduce__(self):  # raised in a Ray worker, it must unpickle on the driver
        return type(self), (self.key, self.reason)


def _require(ok: bool, key: str, reason: str) -> None:
    if not ok:
        raise ConfigError(key, reason)


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


UNET_GROUPS = 32
"""GroupNorm groups throughout raypd's UNet (diffusers' ``norm_num_groups``)."""


def level_resolutions(model: "ModelConfig", resolution: int) -> list[int]:
    """The resolution of each UNet level: every level after the first halves it."""
    return [resolution // 2**i for i in range(len(model.ch_mult))]


def unet_head_size(model: "ModelConfig", resolution: int) -> int | None:
    """The UNet2DModel's ``attention_head_dim``: ``head_channels``, or None for one head per attention block.

    diffusers takes one head size for every attention block (heads = channels // head size); the
    paper's rule, heads = max(1, channels // head_channels), fits it when ``head_channels`` divides
    every attended level's channels, or gives every one of them a single head (channels < 2 x head_channels).
    """
    widths = [model.ch * m for m, r in zip(model.ch_mult, level_resolutions(model, resolution))
              if r in model.attn_resolutions]
    widths.append(model.ch * model.ch_mult[-1])  # the middle block attends too
    if all(w % model.head_channels == 0 for w in widths):
        return model.head_channels
    _require(all(w < 2 * model.head_channels for w in widths), "model.head_channels",
             f"{model.head_channels} neither divides the channels of every level with attention "
             f"{sorted(set(widths))} nor gives each of them one head; choose a head size that divides them all")
    return None


def check_unet_shape(model: "ModelConfig", resolution: int) -> None:
    """Refuse, naming the key, settings raypd's UNet (a diffusers UNet2DModel) cannot be built with."""
    levels = len(model.ch_mult)
    _require(model.ch_mult[0] == 1, "model.ch_mult",
             f"must start with 1, got {list(model.ch_mult)}: the first level works at model.ch channels, the "
             "width the input conv and the time embedding are sized by")
    widths = [model.ch * m for m in model.ch_mult]
    _require(all(w % UNET_GROUPS == 0 for w in widths), "model.ch",
             f"every level needs a multiple of {UNET_GROUPS} channels (GroupNorm with {UNET_GROUPS} groups), but "
             f"ch={model.ch} with ch_mult={list(model.ch_mult)} gives {widths}")
    _require(resolution % 2 ** (levels - 1) == 0, "model.ch_mult",
             f"{levels} levels halve the resolution {levels - 1} times, but data.resolution={resolution} "
             f"is not divisible by {2 ** (levels - 1)}")
    reached = set(level_resolutions(model, resolution))
    for r in model.attn_resolutions:
        _require(r in reached, "model.attn_resolutions",
                 f"{r} is never reached; the UNet's resolutions are {sorted(reached, reverse=True)}")
    unet_head_size(model, resolution)


def _check_optimizer(batch_size: int, lr: float, adam_betas: tuple[float, ...], grad_clip: float) -> None:
    """The checks teacher training and distillation rounds share."""
    _require(batch_size >= 1, "batch_size", f"must be >= 1, got {batch_size}")
    _require(lr > 0, "lr", f"must be positive, got {lr}")
    _require(len(adam_betas) == 2 and all(0 <= b < 1 for b in adam_betas), "adam_betas",
             f"must be two numbers in [0, 1), got {list(adam_betas)}")
    _require(grad_clip > 0, "grad_clip", f"must be positive, got {grad_clip}")


@dataclass(frozen=True)
class DataConfig:
    source: Literal["digits", "shards", "mnist", "cifar", "npz", "folder"] = "digits"
    """Where training images come from. ``shards``: the WebDataset shards at ``shards`` (what
    clusters use). ``digits``: the 1,797 real 8x8 handwritten digits bundled with scikit-learn (no
    download). ``mnist`` (IDX files), ``cifar`` (python pickles), ``npz`` (arrays x, y) and
    ``folder`` (images, one sub-folder per class or flat) read ``path``. All but ``shards`` are
    written as shards at ``resolution`` into the run's storage on first use and read from there."""
    path: str = ""
    """The data set file or directory for the ``mnist``, ``cifar``, ``npz`` and ``folder`` sources."""
    labels_path: str = ""
    """MNIST's labels file (``mnist`` source); empty trains unlabelled."""
    shards: str = ""
    """Training shard URLs for ``source: shards``: a brace pattern (``/data/train-{000000..000127}.tar``,
    ``s3://bucket/train-{000000..000127}.tar``), a comma-separated list, or a directory of train-*.tar."""
    resolution: int = 16
    """Image side in pixels; the model is built for this size and the shards must match it."""
    channels: int = 1
    """Image channels (1 grey, 3 RGB)."""
    num_classes: int = 0
    """0 trains an unconditional model; > 0 a class-conditional one with this many classes."""
    random_flip: bool = False
    """Random horizontal flips, as the paper uses for CIFAR-10 and LSUN (wrong for digits)."""
    loader_workers: int = 1
    """DataLoader worker processes per training process; images are decoded there, ahead of the step."""
    shuffle_buffer: int = 1000
    """Samples held in each loader's shuffle buffer."""
    max_skipped_fraction: float = 0.05
    """Stop with a data error when more than this share of the samples read (after the first 200) were
    corrupt or unreadable; skipped samples are counted and reported either way."""

    def validate(self) -> None:
        _require(self.source != "shards" or bool(self.shards.strip()), "shards",
                 "must name the training shards when source is 'shards'")
        _require(self.source in ("shards", "digits") or bool(self.path.strip()), "path",
                 f"must name the data set's file or directory when source is {self.source!r}")
        _require(self.resolution >= 4, "resolution", f"must be at least 4, got {self.resolution}")
        _require(self.channels in (1, 3), "channels", f"must be 1 or 3, got {self.channels}")
        _require(self.num_classes >= 0, "num_classes", f"must be >= 0, got {self.num_classes}")
        _require(self.loader_workers >= 0, "loader_workers", f"must be >= 0, got {self.loader_workers}")
        _require(self.shuffle_buffer >= 1, "shuffle_buffer", f"must be >= 1, got {self.shuffle_buffer}")
        _require(0.0 <= self.max_skipped_fraction <= 1.0, "max_skipped_fraction",
                 f"must lie in [0, 1], got {self.max_skipped_fraction}")


@dataclass(frozen=True)
class ModelConfig:
    ch: int = 32
    """Base channel count of the UNet (the paper: 256 for CIFAR-10, 192 for ImageNet 64)."""
    ch_mult: tuple[int, ...] = (1, 2)
    """Channel multiplier per resolution level; each level after the first halves the resolution."""
    num_res_blocks: int = 1
    """Residual blocks per level in the down path (the up path has one more)."""
    attn_resolutions: tuple[int, ...] = (8,)
    """Resolutions (in pixels) that get self-attention blocks."""
    dropout: float = 0.1
    """Dropout while training the teacher; students always train with dropout 0."""
    class_dropout: float = 0.0
    """Label dropout while training a class-conditional teacher: the probability that an example's label is
    replaced by an extra "no class" label, so one network is both the conditional and the unconditional model
    that classifier-free guidance combines (Ho & Salimans; 0.1-0.2 is usual). 0: no "no class" label, no
    guidance."""
    head_channels: int = 32
    """Channels per attention head."""
    resblock_updown: bool = True
    """BigGAN-style residual down/up-sampling blocks (the paper's) instead of strided convs."""
    parameterization: Parameterization = "both"
    """Network output: ``eps``, ``x``, ``v`` or ``both`` (the paper's combined x/eps output)."""
    backbone: Literal["unet", "diffusers"] = "unet"
    """``unet``: raypd's UNet, a diffusers UNet2DModel in the paper's configuration built from the settings
    above and conditioned on logsnr. ``diffusers``: an imported UNet2DModel built from
    ``diffusers_unet``; set by importing a diffusers teacher (``teacher.source: diffusers``), not by hand."""
    diffusers_unet: dict[str, Any] = field(default_factory=dict)
    """The UNet2DModel config of a ``diffusers`` backbone (written by the teacher import)."""
    diffusers_betas: tuple[float, ...] = ()
    """The betas of the discrete schedule a ``diffusers`` backbone was trained on: its integer timestep input
    is found from logsnr through this table (written by the teacher import)."""

    def validate(self) -> None:
        _require(self.backbone != "diffusers" or bool(self.diffusers_unet), "diffusers_unet",
                 "must hold the UNet2DModel config when backbone is 'diffusers' (import a diffusers teacher)")
        _require(self.backbone != "diffusers" or len(self.diffusers_betas) >= 2, "diffusers_betas",
                 "must hold the training betas when backbone is 'diffusers' (import a diffusers teacher)")
        _require(self.backbone != "diffusers" or self.parameterization != "both", "parameterization",
                 "'both' needs 2C output channels; a diffusers UNet2DModel outputs C: use eps, x or v")
        _require(self.ch > 0, "ch", f"must be positive, got {self.ch}")
        _require(len(self.ch_mult) >= 1 and min(self.ch_mult) > 0, "ch_mult",
                 f"must be a non-empty list of positive integers, got {list(self.ch_mult)}")
        _require(self.num_res_blocks >= 1, "num_res_blocks", f"must be >= 1, got {self.num_res_blocks}")
        _require(0.0 <= self.dropout < 1.0, "dropout", f"must lie in [0, 1), got {self.dropout}")
        _require(0.0 <= self.class_dropout < 1.0, "class_dropout", f"must lie in [0, 1), got {self.class_dropout}")
        _require(self.head_channels > 0, "head_channels", f"must be positive, got {self.head_channels}")


@dataclass(frozen=True)
class DiffusionConfig:
    logsnr_min: float = -20.0
    """logsnr at t = 1 (the cosine schedule is clipped here)."""
    logsnr_max: float = 20.0
    """logsnr at t = 0."""
    weighting: Weighting = "snr_trunc"
    """Loss weighting of the x-space MSE: ``snr_trunc`` (the paper's), ``snr``, ``snr+1``, ``constant``."""
    schedule: Schedule = "cosine"
    """t -> logsnr: ``cosine`` (the paper's, between logsnr_min and logsnr_max) or ``discrete``: a teacher's own
    T-step schedule given by ``discrete_betas``, with t = (k + 1) / T for timestep k (diffusers' "trailing"
    spacing) and logsnr_max at t = 0. An imported diffusers teacher sets it."""
    discrete_betas: tuple[float, ...] = ()
    """The betas of the ``discrete`` schedule's T timesteps (written by the teacher import)."""

    def validate(self) -> None:
        _require(self.logsnr_min < self.logsnr_max, "logsnr_min",
                 f"must be below logsnr_max ({self.logsnr_max}), got {self.logsnr_min}")
        if self.schedule == "discrete":
            _require(len(self.discrete_betas) >= 2, "discrete_betas",
                     "must list the betas of at least 2 timesteps when schedule is 'discrete'")
            _require(all(0 < b < 1 for b in self.discrete_betas), "discrete_betas",
                     "every beta must lie strictly between 0 and 1")
        else:
            _require(not self.discrete_betas, "discrete_betas", "only the 'discrete' schedule takes betas")

    def logsnr_fn(self):
        """The run's t -> logsnr function (the one builder every stage, sampler and evaluation uses)."""
        from raypd.diffusion import make_logsnr_fn

        return make_logsnr_fn(self.schedule, logsnr_min=self.logsnr_min, logsnr_max=self.logsnr_max,
                              betas=self.discrete_betas)


@dataclass(frozen=True)
class TeacherConfig:
    checkpoint: str = ""
    """A trained teacher's checkpoint directory; empty trains a teacher first."""
    source: Literal["raypd", "diffusers"] = "raypd"
    """``raypd``: the teacher is ``checkpoint`` or trained now. ``diffusers``: a diffusers UNet2DModel and its
    scheduler at ``diffusers_path`` are imported into the run's ``teacher`` checkpoint (no training); the run
    then uses its network and its own discrete noise schedule."""
    diffusers_path: str = ""
    """The diffusers model to import: a local pipeline or UNet directory, or a Hugging Face hub id."""
    diffusers_local_only: bool = False
    """Never reach the hub when importing (diffusers' ``local_files_only``); local directories never do."""
    diffusers_student_parameterization: Literal["eps", "x", "v"] = "v"
    """Output parameterization of the students of an imported diffusers teacher (which keeps its own
    prediction type). The students start from the teacher's weights and the first round learns to re-read
    its output this way; ``v`` keeps an eps teacher's reading at low noise, and eps is unstable at few steps."""
    sampling_steps: int = 64
    """The teacher's own DDIM step count: its full-quality sampler and the first round's teacher."""
    updates: int = 1200
    """Optimizer updates of teacher training."""
    batch_size: int = 64
    """Global batch size of teacher training."""
    lr: float = 1e-3
    """Peak learning rate (Adam) of teacher training."""
    warmup_updates: int = 200
    """Linear learning-rate warm-up at the start of teacher training."""
    lr_decay: Literal["constant", "linear"] = "constant"
    """After the warm-up: ``constant`` (the paper's, for its hundreds of thousands of updates) or ``linear`` decay to 0
    by the last update (a short budget's teacher ends better at the same compute)."""
    ema_decay: float = 0.995
    """EMA decay of the teacher's weights (the paper: 0.9999 over hundreds of thousands of updates)."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """Adam's (beta1, beta2)."""
    grad_clip: float = 1.0
    """Gradient-norm clipping threshold."""

    def validate(self) -> None:
        _require(self.sampling_steps >= 1, "sampling_steps", f"must be >= 1, got {self.sampling_steps}")
        _require(self.source != "diffusers" or bool(self.diffusers_path.strip()), "diffusers_path",
                 "must name the diffusers model (directory or hub id) when source is 'diffusers'")
        _require(self.source != "diffusers" or not self.checkpoint, "checkpoint",
                 "must be empty when source is 'diffusers' (the import is written to the run's teacher directory)")
        _require(self.updates >= 0, "updates", f"must be >= 0, got {self.updates}")
        _require(self.warmup_updates >= 0, "warmup_updates", f"must be >= 0, got {self.warmup_updates}")
        _require(0.0 <= self.ema_decay < 1.0, "ema_decay", f"must lie in [0, 1), got {self.ema_decay}")
        _check_optimizer(self.batch_size, self.lr, self.adam_betas, self.grad_clip)


@dataclass(frozen=True)
class DistillConfig:
    start_steps: int = 32
    """Teacher sampling steps of the first round; round k's student samples in start_steps / 2^k."""
    end_steps: int = 1
    """The last round's student step count."""
    method: str = "progressive"
    """The distillation method, by its registered name (``raypd.methods``): ``progressive`` (halving rounds,
    Salimans & Ho), ``tract`` (transitive-closure phases, Berthelot et al. 2023), ``denoising_student`` (one step
    onto the teacher's samples, Luhman & Luhman 2021), or one registered by a plugin. A method's own settings live
    in its section, ``distill.<method>.<key>`` (e.g. ``distill.tract.phases``), checked by the method."""
    options: dict[str, Any] = field(default_factory=dict)
    """The methods' own sections as given (``distill.tract``, ...): raypd.methods reads and checks them."""
    guidance_min: float = 0.0
    """Guided distillation (Meng et al. 2023), with ``guidance_max``: the range of classifier-free guidance
    weights w the students learn, each training example drawing its w from it (``guidance_endpoints``)."""
    guidance_max: float = 0.0
    """Above 0, the distillation is guided: a first stage (``guidance_updates``) trains a student that takes w as
    an input to match the teacher's guided prediction (1 + w) x_hat(z, c) - w x_hat(z, no class) at t ~ U(0, 1),
    and the rounds then distil that w-conditioned student, every teacher step at the student's own w. Needs a
    class-conditional teacher trained with ``model.class_dropout``."""
    guidance_updates: int = 400
    """Guided distillation: optimizer updates of the first stage (the w-conditioned student)."""
    guidance_lr: float = 1e-4
    """Guided distillation: the first stage's learning rate (the rounds keep ``lr``), decayed linearly to 0. The
    network it trains already is the teacher: a lower rate than a round's keeps it from drifting away from the
    teacher's own (w = 0) prediction while it learns the others. A sweep of the first stage sweeps this one."""
    guidance_embedding_lr_factor: float = 10.0
    """Guided distillation: in the first stage the w embedding, which starts at zero and has everything to
    learn, trains at this multiple of ``guidance_lr`` (the rest of the network at ``guidance_lr``)."""
    guidance_endpoints: float = 0.5
    """Guided distillation, both stages: the share of training examples whose w is one end of the range, half at
    ``guidance_min`` and half at ``guidance_max``; the others draw w uniformly in between (0: all uniform, as
    Meng et al.). Weight on w = guidance_min keeps the student's least-guided samples, the ones most sensitive to
    any error, anchored to the teacher's."""
    guidance_loss_power: float = 0.0
    """Guided distillation, first stage: each example's loss is scaled by (1 + w)^-p. The guided target
    (1 + w) x_hat(z, c) - w x_hat(z, no class) and the student's error on it grow with w, so an unweighted loss
    (0, as Meng et al.) spends the shared network on the most guided examples and lets the w = 0 prediction, the
    teacher's own, drift; a power above 0 gives the less guided examples back their share."""
    updates_per_round: int = 800
    """Optimizer updates per round or TRACT phase (the paper: 50,000)."""
    late_rounds_factor: float = 1.0
    """Update-budget multiplier for the hardest rounds (the paper doubles the rounds to 2 and to 1 step)."""
    late_rounds_max_steps: int = 2
    """Rounds whose student samples in at most this many steps get ``late_rounds_factor``."""
    batch_size: int = 16
    """Global batch size of each round."""
    lr: float = 3e-4
    """Initial learning rate of each round, decayed linearly to 0 with no warm-up."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """Adam's (beta1, beta2); every round starts a fresh optimizer."""
    grad_clip: float = 1.0
    """Gradient-norm clipping threshold."""

    @property
    def guided(self) -> bool:
        """Whether the distillation is guided (a w-conditioned student first, then the rounds)."""
        return self.guidance_max > 0

    def validate(self) -> None:
        _require(_power_of_two(self.start_steps), "start_steps", f"must be a power of two, got {self.start_steps}")
        _require(0.0 <= self.guidance_min <= self.guidance_max, "guidance_min",
                 f"must lie in [0, guidance_max ({self.guidance_max})], got {self.guidance_min}")
        _require(self.guidance_updates >= 1, "guidance_updates", f"must be >= 1, got {self.guidance_updates}")
        _require(self.guidance_lr > 0, "guidance_lr", f"must be positive, got {self.guidance_lr}")
        _require(self.guidance_embedding_lr_factor > 0, "guidance_embedding_lr_factor",
                 f"must be positive, got {self.guidance_embedding_lr_factor}")
        _require(0.0 <= self.guidance_endpoints <= 1.0, "guidance_endpoints",
                 f"must lie in [0, 1], got {self.guidance_endpoints}")
        _require(self.guidance_loss_power >= 0, "guidance_loss_power",
                 f"must be >= 0 (0: every w weighs the same), got {self.guidance_loss_power}")
        _require(_power_of_two(self.end_steps), "end_steps", f"must be a power of two, got {self.end_steps}")
        _require(self.end_steps < self.start_steps, "end_steps",
                 f"must be below start_steps ({self.start_steps}), got {self.end_steps}")
        _require(self.updates_per_round >= 1, "updates_per_round", f"must be >= 1, got {self.updates_per_round}")
        _require(self.late_rounds_factor > 0, "late_rounds_factor", f"must be positive, got {self.late_rounds_factor}")
        _check_optimizer(self.batch_size, self.lr, self.adam_betas, self.grad_clip)
        _require(bool(self.method.strip()), "method", "must name a distillation method")
        for name, section in self.options.items():
            _require(isinstance(section, dict), name, f"a method's settings must be a mapping, got {section!r}")

    SECTIONS = "options"
    """Keys of this section that hold a mapping and are not fields are collected here (the methods' sections)."""
    MOVED = {"phases": "tract.phases", "self_teacher_ema": "tract.self_teacher_ema", "pairs": "denoising_student.pairs"}
    """Settings that moved into a method's section: refused with their new place."""


@dataclass(frozen=True)
class EvalConfig:
    extractor: Literal["classifier", "inception"] = "classifier"
    """FID/KID features: ``inception`` (Inception-v3, the standard; ~0.15 s per image on a CPU) or
    ``classifier`` (a small classifier trained once on the run's labelled data; cheap, for local
    runs). Numbers from different extractors are never compared."""
    inception_weights: str = ""
    """Inception-v3 weights in torch-fidelity's format for offline machines; empty downloads them."""
    num_samples: int = 1024
    """Samples per evaluated sampler (the paper: 50,000), all from the same noise seeds. FID is biased upwards at
    small counts, and by different amounts for different samplers, so a few hundred samples misstate the gap a
    student closes (see ``configs/local.yaml``)."""
    reference_samples: int = 2000
    """Training images behind the reference statistics (fewer when the data set is smaller)."""
    classifier_updates: int = 600
    """Training updates of the classifier extractor."""
    kid: bool = True
    """Also report KID (unbiased, better than FID at small sample counts)."""
    precision_recall: bool = False
    """Also report improved precision and recall."""
    stochastic: bool = False
    """Also evaluate the teacher's stochastic (ancestral) sampler at every step count."""
    seed: int = 1234
    """Seed of the evaluation noise and class labels: the same for every sampler and round."""
    distributed: bool = True
    """With dist.workers > 0, generate samples and extract features on dist.workers Ray tasks (one GPU each
    with dist.use_gpu); the driver only gathers features and computes the metrics."""
    grid_size: int = 64
    """Images in each saved sample grid."""
    reference_steps: int = 0
    """Teacher DDIM steps of its full-quality sampler (the baseline); 0 uses teacher.sampling_steps. Set it where
    the teacher's DDIM has stopped improving (the run's FID-against-steps curve shows where): the full sampler is
    scored with num_samples, the most expensive point of a run that starts from many steps."""
    max_standard_steps: int = 0
    """Points at or below this many sampling steps (the few-step students and the teacher's DDIM there) are scored
    with num_samples, and so is the teacher's full sampler; points above it with many_step_samples. 0: every point
    with num_samples."""
    many_step_samples: int = 0
    """Samples of a point above max_standard_steps (the many-step rounds' students and the teacher's DDIM there):
    fewer than num_samples, so their FID reads higher than the standard points' (their KID does not), and the
    report marks them; 0 does not score them."""
    chunk_size: int = 2048
    """Samples per evaluation chunk (a multiple of 256): each chunk is sampled and its features extracted as one
    unit of work (one Ray task with dist.workers > 0), and the driver holds about one chunk of images at a time,
    whatever num_samples is. The samples do not depend on it."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """The network's forward when sampling for evaluation: auto is bf16 on GPUs that have it and fp32 otherwise.
    The parameterization arithmetic and the sampler's steps stay fp32; the feature extractor runs in fp32."""
    guidance: tuple[float, ...] = ()
    """Classifier-free guidance weights w at which every sampler is scored (a guided teacher: ``model.class_dropout``
    > 0): each point is evaluated once per w, from the same noise and labels. Empty: unguided (w = 0 is the plain
    conditional model). A guided distillation scores its w range's ends and middle when this is empty."""

    def validate(self) -> None:
        _require(all(w >= 0 for w in self.guidance), "guidance", f"weights must be >= 0, got {list(self.guidance)}")
        _require(len(set(self.guidance)) == len(self.guidance), "guidance",
                 f"lists a weight twice: {list(self.guidance)}")
        _require(self.num_samples >= 2, "num_samples", f"must be >= 2, got {self.num_samples}")
        _require(self.reference_samples >= 2, "reference_samples", f"must be >= 2, got {self.reference_samples}")
        _require(self.classifier_updates >= 1, "classifier_updates", f"must be >= 1, got {self.classifier_updates}")
        _require(self.grid_size >= 1, "grid_size", f"must be >= 1, got {self.grid_size}")
        _require(self.reference_steps >= 0, "reference_steps", f"must be >= 0, got {self.reference_steps}")
        _require(self.max_standard_steps >= 0, "max_standard_steps", f"must be >= 0, got {self.max_standard_steps}")
        _require(self.many_step_samples == 0 or 2 <= self.many_step_samples <= self.num_samples, "many_step_samples",
                 f"must be 0 (not scored) or between 2 and eval.num_samples={self.num_samples}, got "
                 f"{self.many_step_samples}")
        _require(self.chunk_size >= 256 and self.chunk_size % 256 == 0, "chunk_size",
                 f"must be a positive multiple of 256 (the noise is drawn in blocks of 256), got {self.chunk_size}")


@dataclass(frozen=True)
class DistConfig:
    workers: int = 0
    """Ray Train workers per run (teacher training and each round); 0 runs in this process with
    the plain-PyTorch engine and no Ray."""
    use_gpu: bool = False
    """One GPU per worker; false runs the workers on CPUs (gloo)."""
    resources_per_worker: dict[str, float] = field(default_factory=dict)
    """Ray resources each worker reserves, e.g. ``{CPU: 8, GPU: 1}`` or a custom resource a node type offers;
    empty: Ray Train's default (1 CPU, plus 1 GPU with use_gpu). A worker's bundle must fit on one node."""
    accelerator_type: str = ""
    """The GPU type every worker runs on (Ray's accelerator type, e.g. ``A100``, ``H100``; needs use_gpu);
    empty: any."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage of the student: 0 (plain data parallel), 1, 2 or 3."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Student training precision. bf16: DeepSpeed keeps bf16 weights for the forward (run under autocast)
    and fp32 master weights in the optimizer; the student handed to the next stage is the fp32 master.
    fp16 needs GPUs (it is refused on CPU)."""
    teacher_dtype: Literal["auto", "fp32", "bf16"] = "auto"
    """The frozen teacher's forward precision in distillation (two of an update's five forward-equivalents):
    auto is bf16 on GPUs that have it and fp32 otherwise. Only the network runs in bf16: the DDIM steps and
    the inversion to the target x (which divides by small differences of alpha and sigma) stay fp32."""
    offload_optimizer: bool = False
    """Keep the optimizer state in CPU memory (ZeRO-Offload; ZeRO stage 1, 2 or 3). The optimizer is DeepSpeed's
    CPU Adam where that op was compiled into the install, torch's Adam on the offloaded states otherwise."""
    offload_params: bool = False
    """Keep the parameters in CPU memory (needs ZeRO stage 3)."""
    gradient_checkpointing: bool = False
    """Recompute each residual block's activations in the backward pass instead of keeping them (only the
    blocks' inputs are kept): less activation memory (``--dry-run`` estimates it) for about one more student
    forward per update. Training is otherwise unchanged (same losses and gradients)."""
    bucket_elements: int = 50_000_000
    """Elements per ZeRO gradient-reduce bucket (ZeRO stages 1-3) and parameter all-gather bucket (stages 1-2).
    DeepSpeed's own default, 500M, holds 1 GB of bf16 gradients per bucket on every GPU, and overlap_comm
    keeps about 4.5 times the buckets' size."""
    overlap_comm: bool = True
    """Reduce one bucket of gradients while the backward pass fills the next (ZeRO stages 1-3), instead of
    all of them after backward."""
    checkpoint_every: int = 100
    """Updates between checkpoints inside a stage (Ray workers and local mode alike); an interrupted stage
    loses at most this many."""
    keep_checkpoints: int = 2
    """Checkpoints kept per run (the newest ones)."""
    checkpoint_upload: Literal["async", "sync"] = "async"
    """How Ray Train workers hand a checkpoint to the run's storage. async: each rank writes its files to
    dist.staging_dir and training goes on while Ray uploads them (a worker lost during an upload resumes from
    the checkpoint before it, so up to two intervals are redone); sync: training waits until the checkpoint is
    committed. A stage's final checkpoint is always waited for. Local mode (dist.workers=0) renames its
    checkpoints into place and has nothing to upload."""
    staging_dir: str = ""
    """A folder on each worker node's own fast disk (an NVMe mount, say) where ranks write a checkpoint before
    Ray uploads it; empty: the node's temporary folder."""
    max_failures: int = 2
    """Worker-group restarts a run may use before it fails."""
    scale_timeout_s: float = 1800.0
    """On an autoscaling cluster: seconds the driver waits for the nodes its workers need to come up
    (asked for with Ray's ``request_resources``) before it gives up naming what never arrived."""
    node_wait_s: float = 900.0
    """Seconds a stage's worker group, restarting after it lost a node, waits for its workers to be placed again
    (a cloud boots a replacement node in minutes; Ray Train's own default is 60 s). Each of the dist.max_failures
    restarts waits up to this long; while it waits the driver says for what, and when it runs out the stage stops
    naming the lost nodes (rerunning resumes it from its last checkpoint)."""
    collective_timeout_s: int = 600
    """Seconds a collective may wait before the worker group is declared stuck."""
    nonfinite_patience: int = 20
    """Consecutive updates skipped for a non-finite loss or gradient before the stage rolls back to its
    last checkpoint with a lower learning rate."""
    rollback_lr_factor: float = 0.5
    """Learning-rate multiplier applied at each roll-back."""
    max_rollbacks: int = 3
    """Roll-backs before a stage whose updates keep failing stops with a numerical error."""

    def validate(self) -> None:
        _require(self.workers >= 0, "workers", f"must be >= 0, got {self.workers}")
        _require(self.zero_stage in (0, 1, 2, 3), "zero_stage", f"must be 0, 1, 2 or 3, got {self.zero_stage}")
        _require(not self.offload_params or self.zero_stage == 3, "offload_params", "needs zero_stage 3")
        _require(not self.offload_optimizer or self.zero_stage >= 1, "offload_optimizer",
                 "needs zero_stage 1, 2 or 3 (stage 0 keeps no optimizer partition to offload)")
        _require(self.precision != "fp16" or self.use_gpu, "precision", "fp16 needs GPUs (use bf16 or fp32 on CPU)")
        for name, amount in self.resources_per_worker.items():
            _require(bool(name.strip()), "resources_per_worker", "resource names must not be empty")
            _require(isinstance(amount, (int, float)) and not isinstance(amount, bool) and amount >= 0,
                     "resources_per_worker", f"{name} must be a number >= 0, got {amount!r}")
        _require(not self.resources_per_worker.get("GPU") or self.use_gpu, "resources_per_worker",
                 "reserves GPUs, which needs dist.use_gpu=true")
        _require(not self.accelerator_type or self.use_gpu, "accelerator_type", "needs dist.use_gpu=true")
        local = "dist.workers=0 trains in this process on the plain-PyTorch engine, in fp32 with no ZeRO; "
        _require(self.workers > 0 or self.precision == "fp32", "precision",
                 local + f"{self.precision} runs on DeepSpeed workers (set dist.workers >= 1, or precision fp32)")
        for key in ("offload_optimizer", "offload_params"):
            _require(self.workers > 0 or not getattr(self, key), key,
                     local + "offloading runs on DeepSpeed workers (set dist.workers >= 1)")
        _require(self.bucket_elements >= 1_000_000, "bucket_elements",
                 f"must be >= 1000000 (smaller buckets only add collectives), got {self.bucket_elements}")
        _require(self.checkpoint_every >= 1, "checkpoint_every", f"must be >= 1, got {self.checkpoint_every}")
        _require(self.keep_checkpoints >= 1, "keep_checkpoints", f"must be >= 1, got {self.keep_checkpoints}")
        _require(not self.staging_dir or (self.staging_dir.startswith("/") and "://" not in self.staging_dir),
                 "staging_dir", f"must be an absolute path on each worker node's own disk, got {self.staging_dir!r}")
        _require(self.max_failures >= 0, "max_failures", f"must be >= 0, got {self.max_failures}")
        _require(self.scale_timeout_s > 0, "scale_timeout_s", f"must be > 0, got {self.scale_timeout_s}")
        _require(self.node_wait_s > 0, "node_wait_s", f"must be > 0, got {self.node_wait_s}")
        _require(self.collective_timeout_s >= 10, "collective_timeout_s", f"must be >= 10, got {self.collective_timeout_s}")
        _require(self.nonfinite_patience >= 1, "nonfinite_patience", f"must be >= 1, got {self.nonfinite_patience}")
        _require(0 < self.rollback_lr_factor <= 1, "rollback_lr_factor",
                 f"must lie in (0, 1], got {self.rollback_lr_factor}")
        _require(self.max_rollbacks >= 0, "max_rollbacks", f"must be >= 0, got {self.max_rollbacks}")


@dataclass(frozen=True)
class SweepConfig:
    enabled: bool = False
    """Sweep every round with Ray Tune instead of training it once; the best trial's student is promoted."""
    trials: int = 4
    """Trials per round (the first one is the round's configured or previously chosen settings)."""
    lr_min: float = 1e-4
    """Lower end of the first round's log-uniform learning-rate range."""
    lr_max: float = 3e-3
    """Upper end of the first round's log-uniform learning-rate range; later rounds centre the same span
    on the learning rate chosen before."""
    lrs: tuple[float, ...] = ()
    """Explicit learning rates to try: a grid, one trial for every learning rate, budget (``updates``) and value
    of each of ``choices`` together (replaces lr_min/lr_max and trials)."""
    updates: tuple[int, ...] = ()
    """Update budgets to search (each trial draws one; every one with ``lrs``); empty: the round's planned
    budget only."""
    examples: int = 0
    """Above 0, every trial trains on this many examples: its update budget is ``examples`` over its
    ``distill.batch_size`` (rounded down), so batch sizes searched in ``choices`` trade against updates at equal
    compute, in every swept round. Replaces ``updates``."""
    choices: tuple[str, ...] = ()
    """Further settings to search, each ``dotted.key=v1|v2|...`` (e.g. ``distill.batch_size=16|32``): each trial
    draws a value (every one with ``lrs``); without ``lrs``, the chosen value starts the next round's search."""
    grace_updates: int = 50
    """ASHA: updates every trial gets before it can be stopped early (at or above the largest budget: none is)."""
    reduction_factor: int = 2
    """ASHA: only the best 1/reduction_factor of the trials at a milestone go on."""
    heldout_samples: int = 256
    """Size of the fixed held-out set (images, noise and times) every trial's loss is measured on."""
    report_every: int = 25
    """Trials report the held-out loss (and checkpoint) every this many updates."""
    fid: bool = True
    """Score each finished trial's student by FID (the run's extractor) and choose by it; else by held-out loss."""
    fid_seeds: int = 1
    """Noise seeds each finished trial's student is scored from, ``eval.num_samples`` samples each; the choice
    goes by the mean FID. Every trial draws the same noise, so trials compare paired; more seeds keep one draw
    of noise from favouring a trial by chance. The seeds are ``eval.seed`` + 10,000, +1, ...: not the noise of
    the run's reported FIDs, which would otherwise favour the trial chosen on it."""
    max_concurrent: int = 0
    """Trials run at once; 0: as many as the cluster's GPUs (or CPUs) hold at dist.workers each."""
    seed: int = 0
    """Seed of the search (which learning rates are tried)."""

    def trials_per_round(self) -> int:
        """Trials a swept round runs: the grid's size with ``lrs`` (every rate, budget and choice together), else
        ``trials``."""
        if not self.lrs:
            return self.trials
        return math.prod([len(self.lrs), max(1, len(self.updates)), *(len(v) for _, v in self.choice_items())])

    def choice_items(self) -> list[tuple[str, list[str]]]:
        """``choices`` split into (dotted key, its values as written), in order."""
        items = []
        for item in self.choices:
            key, _, values = item.partition("=")
            items.append((key.strip(), [v.strip() for v in values.split("|")]))
        return items

    def validate(self) -> None:
        _require(self.trials >= 1, "trials", f"must be >= 1, got {self.trials}")
        _require(0 < self.lr_min < self.lr_max, "lr_min", f"must be positive and below lr_max ({self.lr_max}), "
                 f"got {self.lr_min}")
        for i, lr in enumerate(self.lrs):
            _require(lr > 0, f"lrs[{i}]", f"must be positive, got {lr}")
        for i, u in enumerate(self.updates):
            _require(u >= 1, f"updates[{i}]", f"must be >= 1, got {u}")
        _require(self.examples >= 0, "examples", f"must be >= 0 (0: off), got {self.examples}")
        _require(not (self.examples and self.updates), "examples",
                 f"sets each trial's budget from its batch size; drop sweep.updates ({list(self.updates)}) or set "
                 "sweep.examples=0")
        for i, item in enumerate(self.choices):
            key, sep, values = item.partition("=")
            _require(bool(sep and key.strip() and values.strip()), f"choices[{i}]",
                     f"must look like dotted.key=v1|v2, got {item!r}")
            _require(not key.startswith(("sweep.", "run.")), f"choices[{i}]", f"cannot search {key!r}")
        _require(self.grace_updates >= 1, "grace_updates", f"must be >= 1, got {self.grace_updates}")
        _require(self.reduction_factor >= 2, "reduction_factor", f"must be >= 2, got {self.reduction_factor}")
        _require(self.heldout_samples >= 1, "heldout_samples", f"must be >= 1, got {self.heldout_samples}")
        _require(self.report_every >= 1, "report_every", f"must be >= 1, got {self.report_every}")
        _require(self.fid_seeds >= 1, "fid_seeds", f"must be >= 1, got {self.fid_seeds}")
        _require(self.max_concurrent >= 0, "max_concurrent", f"must be >= 0, got {self.max_concurrent}")


STORAGE_SCHEMES = ("s3", "gs")
SECRET_PARAMS = ("access_key", "secret_key", "session_token", "credentials")


def uri_problem(path: str) -> str | None:
    """What is wrong with a storage URI (None for a path, or a URI raypd can use)."""
    from urllib.parse import parse_qs, urlparse

    if "://" not in path:
        return None
    parsed = urlparse(path)
    if parsed.scheme not in STORAGE_SCHEMES:
        return (f"{path!r}: the scheme {parsed.scheme!r} is not supported; use s3://bucket/prefix, "
                "gs://bucket/prefix or a directory")
    if not parsed.netloc:
        return f"{path!r} names no bucket"
    secret = [k for k in parse_qs(parsed.query) if k.lower() in SECRET_PARAMS]
    if secret or "@" in parsed.netloc:
        return (f"carries credentials ({', '.join(secret) or 'user:password'}), which would be saved with the run's "
                "config; give them through the environment (AWS_* or GOOGLE_APPLICATION_CREDENTIALS)")
    return None


@dataclass(frozen=True)
class RunConfig:
    name: str = "local"
    """Run name: the run's files live in ``storage_path/name``."""
    storage_path: str = "raypd_runs"
    """Where all runs' files go (checkpoints, reports, sample grids): a bucket (``s3://bucket/prefix``,
    ``gs://bucket/prefix``; credentials from the environment, never in the URI) or a directory (on a
    cluster, a shared file system every node sees: NFS, EFS, Filestore)."""
    seed: int = 0
    """Seed of model initialisation, data order and noise."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Device of the local engine: ``auto`` takes a GPU when there is one."""
    log_every: int = 100
    """Print training progress every this many updates."""

    def validate(self) -> None:
        _require(bool(self.name) and not set(self.name) & set("/\\\0") and self.name not in (".", ".."), "name",
                 f"must be a plain directory name (no '/', '\\', '.' or '..'), got {self.name!r}")
        _require(bool(self.storage_path), "storage_path", "must not be empty")
        _require(uri_problem(self.storage_path) is None, "storage_path", str(uri_problem(self.storage_path)))
        _require(self.log_every >= 1, "log_every", f"must be >= 1, got {self.log_every}")


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    """Training data."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The UNet backbone and its output parameterization."""
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    """Noise schedule and loss weighting."""
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    """The teacher: a checkpoint, or how to train one."""
    distill: DistillConfig = field(default_factory=DistillConfig)
    """The halving rounds."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """What is measured after each round."""
    dist: DistConfig = field(default_factory=DistConfig)
    """Ray Train workers and DeepSpeed."""
    sweep: SweepConfig = field(default_factory=SweepConfig)
    """Ray Tune sweeps of each round's learning rate and update budget."""
    run: RunConfig = field(default_factory=RunConfig)
    """Naming, storage, seeds and devices."""

    def validate(self) -> None:
        if self.model.backbone == "unet" and self.teacher.source == "raypd":  # else the imported network's shape rules
            self._validate_native_unet()
        self._validate_guidance()
        _require(self.distill.start_steps <= self.teacher.sampling_steps, "distill.start_steps",
                 f"must not exceed teacher.sampling_steps ({self.teacher.sampling_steps}), got {self.distill.start_steps}")

        w = max(1, self.dist.workers)
        for key, batch in (("teacher.batch_size", self.teacher.batch_size), ("distill.batch_size", self.distill.batch_size)):
            _require(batch % w == 0, key, f"{batch} does not split evenly over dist.workers={self.dist.workers}")

    def guidance_weights(self) -> list[float | None]:
        """The guidance weights every evaluated point is scored at: ``eval.guidance``; for a guided distillation
        without them, its w range's ends and middle; else one unguided pass (None)."""
        if self.eval.guidance:
            return sorted(float(w) for w in self.eval.guidance)
        d = self.distill
        if d.guided:
            return sorted({d.guidance_min, (d.guidance_min + d.guidance_max) / 2, d.guidance_max})
        return [None]

    def middle_guidance_weight(self) -> float | None:
        """The weight a single score of a run is taken at (a sweep trial's, an export's check): the middle one of
        :meth:`guidance_weights`."""
        weights = self.guidance_weights()
        return weights[len(weights) // 2]

    def _validate_guidance(self) -> None:
        classes, dropout = self.data.num_classes, self.model.class_dropout
        _require(dropout == 0 or classes > 0, "model.class_dropout",
                 f"label dropout needs class labels: data.num_classes is 0, got class_dropout {dropout}")
        why = "(classifier-free guidance needs a class-conditional teacher trained with model.class_dropout > 0)"
        if self.distill.guided:
            _require(classes > 0 and dropout > 0, "distill.guidance_max",
                     f"guided distillation needs a guided teacher {why}: data.num_classes {classes}, "
                     f"model.class_dropout {dropout}")
        if self.eval.guidance:
            _require(classes > 0 and dropout > 0, "eval.guidance",
                     f"scoring at guidance weights needs a guided teacher {why}: data.num_classes {classes}, "
                     f"model.class_dropout {dropout}")
            d = self.distill
            _require(d.guided, "eval.guidance", "the students of an unguided distillation never learnt the guided "
                     "prediction; set distill.guidance_max > 0 to distil the guided teacher (its students are then "
                     "scored at these weights), or drop eval.guidance")
            outside = [w for w in self.eval.guidance if not d.guidance_min <= w <= d.guidance_max]
            _require(not outside, "eval.guidance", f"weights {outside} lie outside the distilled range "
                     f"[distill.guidance_min, distill.guidance_max] = [{d.guidance_min}, {d.guidance_max}]: the "
                     "students never saw them")

    def _validate_native_unet(self) -> None:
        check_unet_shape(self.model, self.data.resolution)

    def to_dict(self) -> dict[str, Any]:
        out = _plain(dataclasses.asdict(self))
        out["distill"].update(out["distill"].pop("options"))  # the methods' sections sit under distill
        return out


def _plain(value: Any) -> Any:
    """Tuples to lists, so the dict dumps as plain YAML/JSON."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value
