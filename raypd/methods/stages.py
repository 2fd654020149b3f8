"""What trains a stage, for whoever runs it: the teacher stage's objective, or the run's method's."""

from __future__ import annotations

import importlib

from raypd.config import Config
from raypd.methods.base import method_class, method_for
from raypd.train.objective import Objective, TeacherTraining
from raypd.train.stage import Stage


def objective_for(cfg: Config, stage: Stage) -> Objective:
    """The objective of ``stage``: teacher training, or a stage of the run's method."""
    return method_for(cfg).objective(stage) if stage.distills else TeacherTraining(cfg)


def method_module(cfg: Config) -> str:
    """The module that registers the run's method: a process elsewhere (a Ray worker) imports it before reading
    the config, so a method registered outside raypd is known there too."""
    return method_class(cfg).__module__


def import_method(module: str) -> None:
    importlib.import_module(module)
