"""Training logic, free of Ray and DeepSpeed and of any one method: the stage loop, engines, roles, EMA, LR
schedules."""

from raypd.train.ema import EMA
from raypd.train.engine import Engine, PlainEngine, build_plain_engine, plain_engine
from raypd.train.lr import linear_decay, warmup
from raypd.train.objective import Average, Objective, Role, StageSetup, TeacherTraining, denoising_loss
from raypd.train.rounds import Round, freeze, make_student
from raypd.train.step import StepStats, train_step

__all__ = [
    "EMA", "Average", "Engine", "Objective", "PlainEngine", "Role", "Round", "StageSetup", "StepStats",
    "TeacherTraining", "build_plain_engine", "denoising_loss", "freeze", "linear_decay", "make_student",
    "plain_engine", "train_step", "warmup",
]
