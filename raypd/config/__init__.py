"""Typed, frozen run configuration: the schema (``schema``) and how it is read (``load``)."""

from raypd.config.load import _build, config_from_dict, field_docs, load_config, migrate, redact
from raypd.config.schema import (Config, ConfigError, DataConfig, DiffusionConfig, DistConfig, DistillConfig,
                                 EvalConfig, ModelConfig, RunConfig, SweepConfig, TeacherConfig, _plain)

__all__ = [
    "Config", "ConfigError", "DataConfig", "DiffusionConfig", "DistConfig", "DistillConfig", "EvalConfig",
    "ModelConfig", "RunConfig", "SweepConfig", "TeacherConfig", "_build", "_plain", "config_from_dict",
    "field_docs", "load_config", "migrate", "redact",
]
