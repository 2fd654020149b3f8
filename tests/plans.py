"""A run's planned stages from its distillation settings alone (the rest of the config at its defaults)."""

from raypd.config import Config, DistillConfig
from raypd.methods import method_for


def plan_of(distill: DistillConfig, **config):
    return method_for(Config(distill=distill, **config)).plan()


def method_of(distill: DistillConfig, **config):
    return method_for(Config(distill=distill, **config))
