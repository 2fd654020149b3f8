"""Training logic, free of Ray and DeepSpeed: one train step, engines, EMA, LR schedules, rounds."""

from raypd.train.engine import Engine, PlainEngine, build_plain_engine
from raypd.train.ema import EMA
from raypd.train.lr import linear_decay, warmup
from raypd.train.rounds import Round, freeze, make_student, plan_rounds
from raypd.train.step import Batch, StepStats, diffusion_loss, train_step

__all__ = [
    "EMA", "Batch", "Engine", "PlainEngine", "Round", "StepStats", "build_plain_engine", "diffusion_loss",
    "freeze", "linear_decay", "make_student", "plan_rounds", "train_step", "warmup",
]
