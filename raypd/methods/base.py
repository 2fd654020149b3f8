"""The interface of a distillation method, and the registry that maps ``distill.method`` to it.

A method says, for its whole run, how the run is cut into stages (``plan``), what up-front work it needs
(``upfront``), what an example and that work cost (``forwards_per_example``, ``upfront_forwards``), how its student
samples (``sampler``), and for each stage its ``Objective`` (``raypd.train.objective``): the trained roles, the
frozen networks and averages, every role's loss for one update, and the held-out loss sweeps rank trials by. Its
own settings are a section of the config, ``distill.<name>``, read and checked here (``Options``).

Most distillation methods regress a student onto a target made by frozen networks: ``raypd.methods.regression``
is that objective, and a method changes the parts it needs (the times, the target, the averages it keeps).
Guided distillation is a modifier of the methods that allow it (``raypd.methods.guidance``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar


from raypd.config import Config, ConfigError
from raypd.config.load import build_section, section_docs
from raypd.methods.guidance import PHASE, FirstStage, Guidance
from raypd.methods.regression import Regression
from raypd.train.objective import Objective
from raypd.train.rounds import DISTILL_FORWARDS, Round
from raypd.train.stage import Stage

METHODS: dict[str, type["Method"]] = {}
"""Every registered method by its ``distill.method`` name."""


@dataclass(frozen=True)
class Upfront:
    """Work before a method's first stage: ``pairs`` noises sampled once by the teacher's start_steps-step DDIM
    and kept as (noise, sample) shards in the run, which the stages then read instead of the data."""
    pairs: int


class Method:
    """A distillation method over a whole run. Subclasses set ``name`` and override what they do differently."""

    name: ClassVar[str]
    title: ClassVar[str]
    """How reports and ``raypd compare`` name it."""
    about: ClassVar[str] = ""
    """A sentence for the report's rounds table: what a round of this method is."""
    Options: ClassVar[type | None] = None
    """The dataclass of the method's ``distill.<name>`` section (None: no settings of its own)."""
    guidable: ClassVar[bool] = True
    """Whether guided distillation (``distill.guidance_max > 0``) composes with it."""
    sampler: ClassVar[str] = "ddim"
    """How its students sample in evaluation and export: DDIM on the student's step grid."""

    def __init__(self, cfg: Config):
        self.cfg, self.distill = cfg, cfg.distill
        self.options = self.read_options(cfg)
        self.guidance = Guidance.of(cfg.distill)
        if self.guidance is not None and not self.guidable:
            raise ConfigError("distill.guidance_max", f"guided distillation does not compose with distill.method="
                              f"{self.name}: {self.unguided_reason()}")
        self.check()

    @classmethod
    def read_options(cls, cfg: Config) -> Any:
        raw = cfg.distill.options.get(cls.name, {})
        if cls.Options is None:
            if raw:
                raise ConfigError(f"distill.{cls.name}", f"distill.method={cls.name} has no settings of its own, "
                                  f"got {sorted(raw)}")
            return None
        return build_section(cls.Options, raw, f"distill.{cls.name}")

    def complete(self) -> Config:
        """The config with this method's section written out in full (defaults included), as a run saves it: a
        rerun that states a default, or leaves it out, is the same run."""
        if self.Options is None:
            return self.cfg
        return with_options(self.cfg, **dataclasses.asdict(self.options))

    def unguided_reason(self) -> str:
        return "it has no guided form"

    def check(self) -> None:
        """Refuse settings of the whole config the method cannot honour (a ConfigError naming the key)."""

    # -- how the run is cut into stages ---------------------------------------------------------------
    def step_counts(self) -> list[int]:
        """The student step count of each stage after the guided first stage, in order."""
        raise NotImplementedError

    def plan(self) -> list[Round]:
        """The stages: a guided distillation's first stage, then one per step count, each the previous one's
        student's student, with the late rounds' budget scaled."""
        d, rounds, teacher = self.distill, [], self.distill.start_steps
        if self.guidance is not None:
            rounds.append(self.guidance.first_round(teacher))
        for student in self.step_counts():
            updates = d.updates_per_round
            if student <= d.late_rounds_max_steps:
                updates = max(1, round(updates * d.late_rounds_factor))
            rounds.append(Round(len(rounds), teacher, student, updates))
            teacher = student
        return rounds

    # -- up-front work and compute ---------------------------------------------------------------------
    def upfront(self) -> Upfront | None:
        return None

    def upfront_forwards(self) -> int:
        """Forward-equivalents spent before the first update."""
        return 0

    def forwards_per_example(self) -> int:
        """Forward-equivalents of one training example: two teacher forwards and the student's forward and
        backward (the paper's "about 5/3 of a plain training update")."""
        return DISTILL_FORWARDS

    def stage_lr(self, phase: str = "") -> float:
        """The learning rate a stage of ``phase`` (``Stage.phase``) starts from: ``lr_key``'s value."""
        return float(getattr(self.distill, self.lr_key(phase).removeprefix("distill.")))

    def lr_key(self, phase: str = "") -> str:
        """The setting a stage of ``phase``'s learning rate comes from, which a sweep of the stage overrides."""
        return "distill.guidance_lr" if phase == PHASE else "distill.lr"

    # -- a stage ------------------------------------------------------------------------------------
    def objective(self, stage: Stage) -> Objective:
        if stage.phase == PHASE:
            return FirstStage(self, stage)
        return self.stage_objective(stage)

    def stage_objective(self, stage: Stage) -> Objective:
        return Regression(self, stage)

    # -- documentation -----------------------------------------------------------------------------
    @classmethod
    def option_docs(cls) -> list[tuple[str, str, str]]:
        return [] if cls.Options is None else section_docs(cls.Options, f"distill.{cls.name}")


def register(cls: type[Method]) -> type[Method]:
    """Make ``cls`` the method ``distill.method=<cls.name>`` runs (a class decorator)."""
    known = METHODS.get(cls.name)
    if known is not None and known is not cls and known.__qualname__ != cls.__qualname__:
        raise ValueError(f"a method named {cls.name!r} is registered already ({known.__module__}.{known.__qualname__})")
    METHODS[cls.name] = cls
    return cls


def method_class(cfg: Config) -> type[Method]:
    found = METHODS.get(cfg.distill.method)
    if found is None:
        raise ConfigError("distill.method", f"no method is called {cfg.distill.method!r}; registered: "
                          f"{', '.join(sorted(METHODS))}")
    return found


def method_for(cfg: Config) -> Method:
    """The run's method, its settings read and checked: a ConfigError names any key it refuses, the methods'
    sections of other methods included (a typo there is refused too)."""
    for name in cfg.distill.options:
        if name not in METHODS:
            raise ConfigError(f"distill.{name}", f"no method is called {name!r}, so it has no settings; registered: "
                              f"{', '.join(sorted(METHODS))}")
        if name != cfg.distill.method:
            METHODS[name].read_options(cfg)
    return method_class(cfg)(cfg)


def option_docs() -> list[tuple[str, str, str]]:
    """(dotted key, default, documentation) of every registered method's own settings."""
    return [row for name in sorted(METHODS) for row in METHODS[name].option_docs()]


def with_options(cfg: Config, **options: Any) -> Config:
    """``cfg`` with its method's section replaced by ``options`` (for tests and tools)."""
    sections = {**cfg.distill.options, cfg.distill.method: options}
    return dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, options=sections))
