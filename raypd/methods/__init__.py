"""Distillation methods: one file each, registered by name (``distill.method``).

A method is a subclass of ``Method`` (``base.py``) decorated with ``@register``; importing its module registers it.
The built-in ones are imported here. See ``docs/methods.md`` for how to add one.
"""

from raypd.methods.base import (METHODS, Method, Upfront, method_class, method_for, option_docs, register,
                                with_options)
from raypd.methods import consistency, denoising_student, progressive, scd, tract  # noqa: F401 - registers the built-in methods
from raypd.methods.stages import method_module, objective_for

__all__ = ["METHODS", "Method", "Upfront", "method_class", "method_for", "method_module", "objective_for",
           "option_docs", "register", "with_options"]
