"""Continuous-time consistency distillation, sCD (Lu & Song 2024): the student learns the consistency function's
tangent along the teacher's ODE rather than a finite step of it.

raypd's cosine schedule is TrigFlow's with sigma_d = 1: alpha_t = cos(tau), sigma_t = sin(tau) with tau linear in
t, z_t = cos(tau) x + sin(tau) eps, and a network's implied velocity F = (cos(tau) z - x_hat) / sin(tau) is
TrigFlow's F (a v-parameterized network's own output), so x_hat = cos(tau) z - sin(tau) F is the consistency
function f. Per example:

- tau = atan(e^xi), xi ~ N(p_mean, p_std^2), kept inside the schedule's range;
- the frozen teacher's velocity dx = (cos z - x_T) / sin;
- the target network (the student's weights, stop-gradient, kept as an average of decay 0) gives F- and
  J = cos sin dF-/dtau along (dx, 1): a Jacobian-vector product through the network (``tangent: jvp``), or a
  central difference of the same function along the same direction (``tangent: finite_difference``);
- g = -cos^2 (F- - dx) - r (cos sin z + J), r = min(1, update / warmup_updates), which is cos(tau) df/dtau
  along the teacher's ODE; then g / (|g| + tangent_norm);
- the loss e^w(tau) |F - F- - g|^2 / D - w(tau), whose gradient moves F along g; w is a small learned network
  of tau (the adaptive weighting), its own role ``weighting`` with its own optimizer, trained on the same
  residuals after the student's step of each update.

The student samples with the multistep consistency sampler from EDM's s = 80 (t = 0.992 on the default schedule),
as the published one does, on the grid t_max i / N below it; training draws no times above it. What is not built: a guided teacher's classifier-free guidance in dx, and the tangent in the
frozen networks' lower-precision dtype (it runs in fp32).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from raypd.checkpoint import load_checkpoint
from raypd.config import ConfigError
from raypd.data.batch import Batch
from raypd.diffusion import diffuse
from raypd.diffusion.schedule import per_example
from raypd.methods.base import Method, register
from raypd.train.lr import linear_decay
from raypd.train.objective import Average, Nets, Role, StageSetup, frozen_dtype, frozen_forward
from raypd.train.rounds import freeze, make_student
from raypd.train.stage import Stage

TARGET = "target"
WEIGHTING = "weighting"
START_S = 80.0
"""Where the student's sampler starts, in EDM's noise level s = sigma / alpha (t = 0.992 on the default schedule),
and the top of the training times: at t = 1 the tangent's signal vanishes as cos(tau), so nothing is learnt there."""
_FORWARDS = 7
"""Forward-equivalents per example: the teacher's forward, the target network's forward and its tangent (a JVP's
primal and tangent, or a central difference's two forwards: 3), the student's forward and backward (3)."""


@dataclass(frozen=True)
class ScdOptions:
    tangent: Literal["jvp", "finite_difference"] = "jvp"
    """jvp: torch.func.jvp through the network, its attention in PyTorch's math kernel (the fused kernels have no
    forward-mode derivative); finite_difference: a central difference of the same function along the same
    direction, for a network or kernel a JVP cannot pass through."""
    finite_difference_step: float = 1e-3
    """The central difference's step in tau (finite_difference only)."""
    warmup_updates: int = 10000
    """Tangent warm-up: the J and z terms of g enter with weight min(1, update / warmup_updates)."""
    tangent_norm: float = 0.1
    """g is divided by its norm plus this, per example (tangent normalisation)."""
    p_mean: float = -1.0
    """Mean of xi = log tan(tau), the training time's log-normal proposal (the paper's CIFAR-10 value)."""
    p_std: float = 1.4
    """Standard deviation of xi."""
    adaptive_weighting: bool = True
    """Learn w(tau) (the ``weighting`` role); false: w = 0, every time weighted alike."""

    def validate(self) -> None:
        if self.warmup_updates < 0:
            raise ConfigError("warmup_updates", f"must be >= 0, got {self.warmup_updates}")
        if self.tangent_norm <= 0:
            raise ConfigError("tangent_norm", f"must be > 0, got {self.tangent_norm}")
        if not 0 < self.finite_difference_step < 0.1:
            raise ConfigError("finite_difference_step", f"must lie in (0, 0.1), got {self.finite_difference_step}")
        if self.p_std <= 0:
            raise ConfigError("p_std", f"must be > 0, got {self.p_std}")


class TimeWeighting(nn.Module):
    """w(tau): fixed random Fourier features of tau and a linear read-out that starts at 0."""

    def __init__(self, features: int = 64):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("freqs", torch.randn(features, generator=g) * 4)
        self.register_buffer("phases", torch.rand(features, generator=g) * 2 * math.pi)
        self.linear = nn.Linear(features, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, tau: Tensor) -> Tensor:
        features = torch.cos(tau.float()[:, None] * self.freqs + self.phases) * math.sqrt(2)
        return self.linear(features)[:, 0]


def tau_range(logsnr_fn) -> tuple[float, float]:
    """tau at t = 0 and t = 1 on the run's cosine schedule (tau = atan(sigma / alpha), linear in t)."""
    ends = logsnr_fn(torch.tensor([0.0, 1.0], dtype=torch.float64))
    lo, hi = (math.atan(math.exp(-float(v) / 2)) for v in ends)
    return lo, hi


def velocity(x_hat: Tensor, z: Tensor, tau: Tensor) -> Tensor:
    """TrigFlow's F of an x_hat at z: (cos(tau) z - x_hat) / sin(tau)."""
    return (per_example(torch.cos(tau), z) * z - x_hat) / per_example(torch.sin(tau), z)


class ContinuousConsistency:
    """sCD's stage: the student, the adaptive weighting beside it, the teacher, the target network."""

    reads_pairs = False

    def __init__(self, method, stage: Stage):
        self.method, self.stage, self.cfg = method, stage, method.cfg
        self.options: ScdOptions = method.options
        self.logsnr_fn = self.cfg.diffusion.logsnr_fn()
        self.dtype: torch.dtype | None = None
        self.tau_min, self.tau_max = tau_range(self.logsnr_fn)
        self._residuals: tuple[int, Tensor, Tensor] | None = None

    # -- networks
    def setup(self, device: torch.device) -> StageSetup:
        self.dtype = frozen_dtype(self.cfg.dist.teacher_dtype, device)
        torch.manual_seed(self.cfg.run.seed)
        teacher = freeze(load_checkpoint(self.stage.teacher, map_location=device)[0])
        model = make_student(teacher, self.cfg.model.parameterization)
        if self.cfg.dist.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        if self.options.tangent == "jvp":
            self.check_jvp(teacher, device)
        d = self.cfg.distill
        schedule = linear_decay(self.stage.updates)
        roles = {"student": Role(model, self.method.stage_lr(self.stage.phase), d.adam_betas, schedule, d.grad_clip)}
        if self.options.adaptive_weighting:
            roles[WEIGHTING] = Role(TimeWeighting().to(device), self.method.stage_lr(self.stage.phase), d.adam_betas,
                                    schedule, d.grad_clip, precision="fp32")
        return StageSetup(roles, d.batch_size, frozen={"teacher": teacher},
                          averages={TARGET: Average("student", 0.0, bias_corrected=False)})

    def check_jvp(self, network: nn.Module, device: torch.device) -> None:
        """One small JVP through the network before training: a kernel without a forward-mode derivative is
        refused here, naming the setting, rather than at the first update."""
        c, r = self.cfg.data.channels, self.cfg.data.resolution
        z = torch.zeros(1, c, r, r, device=device)
        y = torch.zeros(1, dtype=torch.long, device=device) if self.cfg.data.num_classes else None
        tau = torch.full((1,), 0.5 * (self.tau_min + self.tau_max), device=device)
        try:
            self.tangent_of(network, z, tau, torch.zeros_like(z), y)
        except (NotImplementedError, RuntimeError) as err:
            raise ConfigError("distill.scd.tangent", f"a Jacobian-vector product does not pass through this network "
                              f"({type(err).__name__}: {str(err).splitlines()[0][:200]}); set "
                              "distill.scd.tangent=finite_difference") from None

    # -- times and the function differentiated
    def draw_tau(self, b: int, generator: torch.Generator | None, like: Tensor) -> Tensor:
        o = self.options
        xi = o.p_mean + o.p_std * torch.randn(b, generator=generator, dtype=torch.float64, device=like.device)
        margin = 2 * o.finite_difference_step
        top = min(self.tau_max - margin, math.atan(START_S))
        return torch.atan(torch.exp(xi)).clamp(self.tau_min + margin, top).to(like.dtype)

    def logsnr_at(self, tau: Tensor) -> Tensor:
        """The run's logsnr at tau (tau is linear in t on the cosine schedule)."""
        return self.logsnr_fn((tau - self.tau_min) / (self.tau_max - self.tau_min))

    def velocity_of(self, network, z: Tensor, tau: Tensor, y: Tensor | None) -> Tensor:
        return velocity(network(z, self.logsnr_at(tau), y).to(z.dtype), z, tau)

    def tangent_of(self, network, z: Tensor, tau: Tensor, dx: Tensor, y: Tensor | None) -> tuple[Tensor, Tensor]:
        """(F-, J): the network's velocity at (z, tau), and cos(tau) sin(tau) times its derivative along
        (dx, 1)."""
        cs = per_example(torch.cos(tau) * torch.sin(tau), z)
        if self.options.tangent == "jvp":
            with sdpa_kernel(SDPBackend.MATH):
                value, derivative = torch.func.jvp(lambda z_, tau_: self.velocity_of(network, z_, tau_, y),
                                                   (z, tau), (cs * dx, cs.flatten()))
            return value, derivative
        h = self.options.finite_difference_step
        value = self.velocity_of(network, z, tau, y)
        ahead = self.velocity_of(network, z + h * dx, tau + h, y)
        behind = self.velocity_of(network, z - h * dx, tau - h, y)
        return value, cs * (ahead - behind) / (2 * h)

    def consistency_tangent(self, nets: Nets, z: Tensor, tau: Tensor, y: Tensor | None, r: float,
                            dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        """(F-, g) before normalisation: the target network's velocity, and g = -cos^2 (F- - dx) - r (cos sin z +
        J), which at r = 1 is cos(tau) df/dtau along the teacher's ODE (f: the target network's x_hat)."""
        with frozen_forward(z, dtype):
            dx = velocity(nets["teacher"](z, self.logsnr_at(tau), y).to(z.dtype), z, tau)
        with torch.inference_mode():
            target, tangent = self.tangent_of(nets[TARGET], z, tau, dx, y)
            cos, sin = per_example(torch.cos(tau), z), per_example(torch.sin(tau), z)
            return target, -cos * cos * (target - dx) - r * (cos * sin * z + tangent)

    def direction(self, nets: Nets, z: Tensor, tau: Tensor, y: Tensor | None, update: int | None
                  ) -> tuple[Tensor, Tensor]:
        """(F-, g / (|g| + tangent_norm)), with the tangent warmed up to ``update`` (None: at its full weight, the
        frozen networks in fp32, as a held-out set is scored)."""
        o = self.options
        r = 1.0 if update is None or o.warmup_updates == 0 else min(1.0, update / o.warmup_updates)
        target, g = self.consistency_tangent(nets, z, tau, y, r, None if update is None else self.dtype)
        with torch.inference_mode():
            norm = per_example(g.flatten(1).norm(dim=1), z)
            g = g / (norm + o.tangent_norm)
        # inference tensors cannot enter autograd; copies made outside inference mode can
        return target.clone(), g.clone()

    # -- the losses
    def residuals(self, nets: Nets, x: Tensor, eps: Tensor, tau: Tensor, y: Tensor | None, update: int | None
                  ) -> Tensor:
        """Per example |F - sg(F) - g|^2 / D (its value |g|^2 / D), with the gradient of the student's F."""
        z = diffuse(x, eps, self.logsnr_at(tau))
        _, g = self.direction(nets, z, tau, y, update)
        student = self.velocity_of(nets["student"], z, tau, y)
        return (student - student.detach() - g).flatten(1).square().mean(1)

    def loss(self, role: str, nets: Nets, batch: Batch, generator: torch.Generator, update: int) -> Tensor:
        if role == WEIGHTING:
            cached = self._residuals
            if cached is None or cached[0] != update:
                raise RuntimeError("the weighting role steps after the student, on the residuals of the same update")
            _, tau, per = cached
            w = nets[WEIGHTING](tau)
            return (torch.exp(w) * per - w).mean()
        x, b = batch.x, batch.x.shape[0]
        eps = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        tau = self.draw_tau(b, generator, x)
        per = self.residuals(nets, x, eps, tau, batch.y, update)
        if WEIGHTING not in nets:
            return per.mean()
        self._residuals = (update, tau.detach(), per.detach())
        with torch.no_grad():
            w = nets[WEIGHTING](tau).float()
        return (torch.exp(w) * per).mean()

    # -- the held-out set: how far each example is from consistency (|g|^2 / D at the full tangent)
    def make_heldout(self, batch: Batch, seed: int) -> dict[str, Tensor]:
        g = torch.Generator().manual_seed(seed)
        x = batch.x.float().contiguous()
        out = {"x": x, "eps": torch.randn(x.shape, generator=g), "tau": self.draw_tau(x.shape[0], g, x)}
        if batch.y is not None:
            out["y"] = batch.y.long().contiguous()
        return out

    def heldout_losses(self, nets: Nets, part: dict[str, Tensor]) -> Tensor:
        nets = {**nets, TARGET: nets["student"]}
        z = diffuse(part["x"], part["eps"], self.logsnr_at(part["tau"]))
        _, g = self.direction(nets, z, part["tau"], part.get("y"), None)
        return g.flatten(1).square().mean(1)


@register
class ContinuousConsistencyDistillation(Method):
    name = "scd"
    title = "sCD"
    about = ("Distilled by continuous-time consistency (sCD): the student's velocity moves along the consistency "
             "function's tangent on the teacher's ODE, a Jacobian-vector product of the stop-gradient student.")
    Options = ScdOptions
    guidable = False

    @property
    def sampler(self) -> str:
        """The multistep consistency sampler from t at s = START_S (``consistency@T``)."""
        lo, hi = tau_range(self.cfg.diffusion.logsnr_fn())
        return f"consistency@{(math.atan(START_S) - lo) / (hi - lo):.6f}"

    def unguided_reason(self) -> str:
        return "sCD here distils an unguided teacher's ODE; distil a guided teacher's fixed-w ODE by progressive rounds"

    def check(self) -> None:
        if self.cfg.diffusion.schedule != "cosine":
            raise ConfigError("diffusion.schedule", "sCD's tangent is TrigFlow's, which is the cosine schedule; "
                              f"got {self.cfg.diffusion.schedule!r} (an imported discrete-time teacher): use "
                              "distill.method=consistency")
        if self.cfg.model.parameterization == "x":
            raise ConfigError("model.parameterization", "an x-parameterized student does not meet the consistency "
                              "boundary condition f(z, 0) = z / alpha_0; use eps, v or both")

    def step_counts(self) -> list[int]:
        return [self.distill.end_steps]

    def forwards_per_example(self) -> int:
        return _FORWARDS

    def stage_objective(self, stage: Stage) -> ContinuousConsistency:
        return ContinuousConsistency(self, stage)
