"""What a stage is: the one description that crosses from the driver to whoever trains it.

A stage is teacher training, one halving round, or one sweep trial of a round (a round with its own
budget and learning rate, reporting a held-out loss). It is plain data: it travels to Ray workers and
Tune trials as a dict and comes back as the same frozen value.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

StageKind = Literal["teacher", "round", "trial"]
KINDS = ("teacher", "round", "trial")


@dataclass(frozen=True)
class Stage:
    kind: StageKind
    name: str
    """Unique within the run: names the stage's checkpoint folder (``teacher``, ``round-00``, ``trial-<id>``)."""
    updates: int
    stream: int
    """Which seeded data/noise stream the stage draws from (0 for the teacher, 1 + round for a round)."""
    sampling_steps: int
    """DDIM steps the trained model samples with (the teacher's full count, or the round's student steps)."""
    shards: tuple[str, ...] = ()
    """The training shards' URLs."""
    round: int | None = None
    teacher: str | None = None
    """The round's teacher checkpoint directory (rounds and trials)."""
    student_steps: int | None = None
    teacher_steps: int | None = None
    """The teacher's sampling steps in the round (None: twice student_steps, a halving round)."""
    heldout: str | None = None
    """A fixed held-out set (trials): its distillation loss is reported at every checkpoint."""
    report_every: int | None = None
    """Updates between checkpoints and reports; None: ``dist.checkpoint_every``."""
    phase: str = ""
    """The round's phase within its method (``raypd.train.rounds.Round.phase``): empty for an ordinary round."""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"stage kind must be one of {KINDS}, got {self.kind!r}")
        if self.updates < 1:
            raise ValueError(f"stage {self.name}: updates must be >= 1, got {self.updates}")
        if self.distills and (self.teacher is None or self.student_steps is None or self.round is None):
            raise ValueError(f"stage {self.name}: a {self.kind} needs its teacher, round and student_steps")
        object.__setattr__(self, "shards", tuple(self.shards))

    @property
    def distills(self) -> bool:
        return self.kind != "teacher"

    @property
    def steps_of_teacher(self) -> int | None:
        """The round's teacher step count: ``teacher_steps``, or twice the student's in a halving round."""
        if self.student_steps is None:
            return None
        return self.teacher_steps if self.teacher_steps is not None else 2 * self.student_steps

    @property
    def label(self) -> str:
        return "teacher" if self.kind == "teacher" else f"round {self.round}"

    def with_(self, **changes: Any) -> "Stage":
        return dataclasses.replace(self, **changes)

    def with_locations(self, where) -> "Stage":
        """The same stage with its files (teacher, held-out set, shards) passed through ``where``: bucket URIs
        for workers elsewhere, their local copies inside a worker."""
        return self.with_(teacher=where(self.teacher) if self.teacher else self.teacher,
                          heldout=where(self.heldout) if self.heldout else self.heldout,
                          shards=tuple(where(url) for url in self.shards))

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["shards"] = list(self.shards)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Stage":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown stage fields {unknown}")
        return cls(**data)


def teacher_stage(updates: int, sampling_steps: int, shards) -> Stage:
    return Stage("teacher", "teacher", updates=updates, stream=0, sampling_steps=sampling_steps, shards=shards)


def round_stage(rnd, teacher: str, shards) -> Stage:
    """The stage of a planned round (``raypd.train.rounds.Round``) distilling ``teacher``."""
    return Stage("round", f"round-{rnd.index:02d}", updates=rnd.updates, stream=1 + rnd.index,
                 sampling_steps=rnd.student_steps, shards=shards, round=rnd.index, teacher=str(teacher),
                 student_steps=rnd.student_steps, teacher_steps=rnd.teacher_steps, phase=rnd.phase)
