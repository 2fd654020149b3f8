"""The objective of most distillation methods: a student regressed onto a target that frozen networks make."""

from __future__ import annotations

import torch
from torch import Tensor

from raypd.checkpoint import load_checkpoint
from raypd.data.batch import Batch
from raypd.diffusion import diffuse, student_times, weighted_mse
from raypd.train.lr import linear_decay
from raypd.train.objective import Average, Nets, Role, StageSetup, frozen_dtype, frozen_forward
from raypd.train.rounds import freeze, make_student
from raypd.train.stage import Stage


class Regression:
    """The objective of a stage that regresses its student onto a target made by frozen networks.

    Per update: noise, then times on the grid (``times``), then guidance weights where the run is guided, then the
    target (``target``) under the frozen networks' forward dtype, and the weighted x-space loss of the student's
    x_hat against it."""

    reads_pairs = False

    def __init__(self, method, stage: Stage):
        self.method, self.stage, self.cfg = method, stage, method.cfg
        self.logsnr_fn = self.cfg.diffusion.logsnr_fn()
        self.weighting = self.cfg.diffusion.weighting
        self.guidance = method.guidance
        self.dtype: torch.dtype | None = None

    # -- networks
    def setup(self, device: torch.device) -> StageSetup:
        """The teacher frozen, the student its trainable copy (w-conditioned in a guided run)."""
        self.dtype = frozen_dtype(self.cfg.dist.teacher_dtype, device)
        torch.manual_seed(self.cfg.run.seed)
        teacher = freeze(load_checkpoint(self.stage.teacher, map_location=device)[0])
        model = make_student(teacher, self.cfg.model.parameterization, guidance_input=self.guidance is not None)
        if self.cfg.dist.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        return StageSetup({"student": self.student_role(model)}, self.cfg.distill.batch_size,
                          frozen={"teacher": teacher}, averages=self.averages())

    def student_role(self, model) -> Role:
        d = self.cfg.distill
        return Role(model, self.method.stage_lr(self.stage.phase), d.adam_betas, linear_decay(self.stage.updates),
                    d.grad_clip)

    def averages(self) -> dict[str, Average]:
        return {}

    # -- what a method changes
    def grid(self) -> int:
        """The step grid the times lie on."""
        return self.stage.student_steps

    def times(self, b: int, generator: torch.Generator | None, like: Tensor) -> Tensor:
        return student_times(b, self.grid(), generator=generator, dtype=like.dtype, device=like.device)

    def target(self, nets: Nets, z_t: Tensor, t: Tensor, y: Tensor | None, w: Tensor | None) -> Tensor:
        raise NotImplementedError

    # -- the loss
    def loss(self, role: str, nets: Nets, batch: Batch, generator: torch.Generator, update: int) -> Tensor:
        x, b = batch.x, batch.x.shape[0]
        eps = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        t = self.times(b, generator, x)
        w = None if self.guidance is None else self.guidance.draw(b, generator, x.device)
        losses = self.losses_at(nets, x, eps, t, batch.y, w, self.dtype)
        scale = self.scale(w)
        return (losses if scale is None else losses * scale.to(losses.dtype)).mean()

    def scale(self, w: Tensor | None) -> Tensor | None:
        """A per-example factor on the loss (None: all 1)."""
        return None

    def losses_at(self, nets: Nets, x: Tensor, eps: Tensor, t: Tensor, y: Tensor | None, w: Tensor | None,
                  dtype: torch.dtype | None) -> Tensor:
        """Per-example weighted x-space loss at given noise and times (and guidance weights)."""
        logsnr_t = self.logsnr_fn(t)
        z_t = diffuse(x, eps, logsnr_t)
        with frozen_forward(z_t, dtype):
            target = self.target(nets, z_t, t, y, w)
        # an inference tensor cannot enter autograd; a copy made outside inference mode can
        target = target.to(z_t.dtype).clone()
        student = nets["student"]
        x_hat = student(z_t, logsnr_t, y) if w is None else student(z_t, logsnr_t, y, w)
        return self.distance(x_hat.float(), target.float(), logsnr_t)

    def distance(self, x_hat: Tensor, target: Tensor, logsnr_t: Tensor) -> Tensor:
        """Per-example loss of the student's x_hat against the target: the weighted squared error."""
        return weighted_mse(x_hat, target, logsnr_t, self.weighting)

    # -- the held-out set
    def make_heldout(self, batch: Batch, seed: int) -> dict[str, Tensor]:
        x, y, b = batch.x, batch.y, batch.x.shape[0]
        g = torch.Generator().manual_seed(seed)
        out = {"x": x.float().contiguous(), "eps": torch.randn(x.shape, generator=g)}
        out["t"] = self.times(b, g, out["x"])
        if self.guidance is not None:
            out["w"] = self.guidance.draw(b, g, "cpu")
        if y is not None:
            out["y"] = y.long().contiguous()
        return out

    def heldout_losses(self, nets: Nets, part: dict[str, Tensor]) -> Tensor:
        """Against the frozen networks in fp32 (their forward dtype is a training speed-up)."""
        return self.losses_at(nets, part["x"], part["eps"], part["t"], part.get("y"), part.get("w"), None)


def bound(model, y: Tensor | None, w: Tensor | None):
    """The network as a function of (z, logsnr) at labels ``y`` (and guidance weights ``w``)."""
    return model.bind(y) if w is None else model.bind(y, w)


def bare(kind: type[Regression], *, student_steps: int, teacher_steps: int | None = None, weighting="snr_trunc",
         logsnr_fn, teacher_dtype: torch.dtype | None = None, guidance=None, phase: str = "") -> Regression:
    """A regression objective outside any run (no config, no method), for networks given as they are: analytic
    teachers, benchmarks. Its ``setup`` is not available; ``loss``, ``target`` and ``heldout_losses`` are."""
    objective = kind.__new__(kind)
    objective.method, objective.cfg, objective.guidance, objective.dtype = None, None, guidance, teacher_dtype
    objective.logsnr_fn, objective.weighting = logsnr_fn, weighting
    objective.stage = Stage("round", "bare", updates=1, stream=0, sampling_steps=student_steps, round=0, teacher="",
                            student_steps=student_steps, teacher_steps=teacher_steps, phase=phase)
    return objective


def regression_loss(kind: type[Regression], nets: Nets, batch: Batch, *, generator: torch.Generator | None = None,
                    update: int = 1, **settings) -> Tensor:
    """Update ``update``'s loss of a regression objective (``bare``'s settings) on ``nets`` (``student``,
    ``teacher`` and what else the objective reads)."""
    return bare(kind, **settings).loss("student", nets, batch, generator, update)
