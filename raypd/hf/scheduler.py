"""A diffusers scheduler config read as what raypd needs from it: T, the betas, the prediction type.

Every DDPM-style diffusers scheduler (DDPM, DDIM, PNDM, DPM-Solver, Euler, ...) describes the same
thing for training: a discrete chain of T timesteps with betas from ``beta_schedule`` (or
``trained_betas``), and what the network predicts. The betas are computed by diffusers itself, so
raypd's table holds exactly the noise levels the network was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from raypd.diffusion.discrete import discrete_logsnr_table
from raypd.models.imported import UnsupportedModelError

PARAMETERIZATION_OF = {"epsilon": "eps", "v_prediction": "v", "sample": "x"}
"""diffusers prediction_type -> raypd parameterization."""
PREDICTION_TYPE_OF = {p: t for t, p in PARAMETERIZATION_OF.items()}
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


@dataclass(frozen=True)
class DiscreteChain:
    betas: tuple[float, ...]
    """One beta per timestep, float32 values exactly as diffusers computes them."""
    prediction_type: str
    """diffusers' name of what the network outputs."""
    scheduler_class: str

    @property
    def num_timesteps(self) -> int:
        return len(self.betas)

    @property
    def parameterization(self) -> str:
        return PARAMETERIZATION_OF[self.prediction_type]


def read_scheduler(config: dict[str, Any]) -> DiscreteChain:
    """The discrete chain a scheduler config describes, or an UnsupportedModelError naming what is wrong."""
    name = config.get("_class_name", "scheduler")
    if "num_train_timesteps" not in config or ("beta_schedule" not in config and "trained_betas" not in config):
        raise UnsupportedModelError(
            f"{name} does not describe a discrete chain of betas (num_train_timesteps and beta_schedule or "
            "trained_betas); raypd imports DDPM-style schedules only")
    prediction_type = config.get("prediction_type", "epsilon")
    if prediction_type not in PARAMETERIZATION_OF:
        raise UnsupportedModelError(f"unknown prediction_type {prediction_type!r} in {name}; raypd reads "
                                    f"{', '.join(PARAMETERIZATION_OF)}")
    if config.get("rescale_betas_zero_snr"):
        raise UnsupportedModelError(f"{name} rescales the betas to zero terminal SNR: logsnr is -inf at the last "
                                    "timestep, where raypd's samplers divide by alpha")
    steps = int(config["num_train_timesteps"])
    trained = config.get("trained_betas")
    schedule = config.get("beta_schedule", "linear")
    if trained is None and schedule not in BETA_SCHEDULES:
        raise UnsupportedModelError(f"unknown beta_schedule {schedule!r} in {name}; raypd reads "
                                    f"{', '.join(BETA_SCHEDULES)} or trained_betas")
    if trained is not None and len(trained) != steps:
        raise UnsupportedModelError(f"{name} lists {len(trained)} trained_betas for {steps} timesteps")
    kwargs = {k: config[k] for k in ("beta_start", "beta_end") if k in config}
    import diffusers
    made = diffusers.DDPMScheduler(num_train_timesteps=steps, beta_schedule=schedule, trained_betas=trained, **kwargs)
    betas = tuple(float(b) for b in made.betas.tolist())
    try:
        discrete_logsnr_table(betas)
    except ValueError as err:
        raise UnsupportedModelError(f"the schedule of {name} cannot be used: {err}") from None
    return DiscreteChain(betas, prediction_type, name)
