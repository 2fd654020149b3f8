"""The paper's diffusion math as pure functions on tensors (torch and the standard library only).

Notation, as in Salimans & Ho (2022):

==========  ===============================================================
symbol      meaning
==========  ===============================================================
x           data, scaled to [-1, 1]
t           continuous time in [0, 1]; t = 1 is pure noise
logsnr      lambda(t) = log(alpha_t^2 / sigma_t^2), the log signal-to-noise ratio
alpha       sqrt(sigmoid(logsnr)), the signal scale
sigma       sqrt(sigmoid(-logsnr)), the noise scale (alpha^2 + sigma^2 = 1)
eps         standard normal noise
z_t         alpha_t x + sigma_t eps, the noisy latent at time t
x_hat       the model's estimate of x from z_t (never clipped in training)
eps_hat     (z_t - alpha_t x_hat) / sigma_t
N           number of sampler steps of the model being trained
x_tilde     the distillation target: the x that makes one student DDIM step
            from z_t land where two teacher DDIM steps land
==========  ===============================================================

Every per-example quantity (``logsnr``, ``t``) has shape ``[B]`` and is broadcast
over the remaining dimensions of the image tensors it meets.
"""

from .schedule import SCHEDULES, Schedule, alpha_sigma, diffuse, logsnr_schedule, make_logsnr_fn
from .params import PARAMETERIZATIONS, Parameterization, eps_from_x, x_from_output
from .loss import WEIGHTINGS, Weighting, loss_weight, weighted_mse
from .ddim import consistency_sample, ddim_sample, ddim_step, stochastic_sample
from .distill import distill_target, student_times, tract_target

__all__ = [
    "PARAMETERIZATIONS", "Parameterization", "SCHEDULES", "Schedule", "WEIGHTINGS", "Weighting",
    "alpha_sigma", "consistency_sample", "ddim_sample", "ddim_step", "diffuse", "distill_target", "eps_from_x",
    "logsnr_schedule", "loss_weight", "make_logsnr_fn", "stochastic_sample", "student_times",
    "tract_target", "weighted_mse",
    "x_from_output",
]
