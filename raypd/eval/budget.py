"""Which points a run scores, with how many samples each, and what that costs.

The readers of a run compare the few-step students with the teacher's DDIM at the same step counts and
with the teacher's full sampler: those points are scored with ``eval.num_samples`` (the standard 50,000 in
the paper configs). The many-step rounds' students score what their teacher scores (nothing is learned from
them but that the round kept quality), so above ``eval.max_standard_steps`` a point gets
``eval.many_step_samples`` samples, or is not scored when that is 0. Those points still draw the curve that
shows where the teacher's DDIM stops improving; every row records its own sample count, and the report marks
the points scored with fewer, whose FID is biased upwards against the others (their KID is not).

The driver's evaluator and the dry run's cost estimate both read the plan from here, so the estimate is of
what the run does.
"""

from __future__ import annotations

from dataclasses import dataclass

from raypd.config import Config

EXTRACTOR_GFLOP = {"inception": 5.71, "classifier": 0.01}
"""Forward cost of a feature extractor per image, GFLOP: Inception-v3 at 299x299 (its published figure); the
classifier extractor is a few small convolutions at the data's resolution (an upper bound)."""


@dataclass(frozen=True)
class EvalPlan:
    num_samples: int
    max_standard_steps: int
    many_step_samples: int
    full_steps: int
    stochastic: bool
    weights: tuple[float | None, ...]

    @classmethod
    def of(cls, cfg: Config) -> "EvalPlan":
        e = cfg.eval
        return cls(e.num_samples, e.max_standard_steps, e.many_step_samples,
                   e.reference_steps or cfg.teacher.sampling_steps, e.stochastic, tuple(cfg.guidance_weights()))

    def samples(self, steps: int) -> int:
        """Samples of a point at ``steps`` sampling steps (the teacher's full sampler is not one of these: it always
        gets the standard count); 0: the point is not scored."""
        if not self.max_standard_steps or steps <= self.max_standard_steps:
            return self.num_samples
        return self.many_step_samples

    def standard(self, samples: int) -> bool:
        return samples == self.num_samples

    def teacher_points(self, step_counts) -> list[tuple[str, int, int]]:
        """(sampler, steps, samples) of the teacher's points beside its full sampler, at the step counts the
        students reach, largest first: its DDIM and, with ``eval.stochastic``, its ancestral sampler."""
        points = []
        for n in sorted(set(step_counts), reverse=True):
            k = self.samples(n)
            if not k:
                continue
            if n != self.full_steps:  # a guided distillation's first student samples in the full count
                points.append(("teacher_ddim", n, k))
            if self.stochastic:
                points.append(("teacher_stochastic", n, k))
        return points

    def costs(self, step_counts, *, guided_teacher: bool, student_forwards: int = 1) -> dict[str, float]:
        """Image forwards of the network per part of the evaluation (every guidance weight included, where the
        guided teacher's steps cost two forwards: conditional and unconditional), and the images the feature
        extractor sees. ``student_forwards``: network forwards of a student's step."""
        per_teacher_step = 2 if guided_teacher else 1
        w = len(self.weights)
        full = self.full_steps * self.num_samples * per_teacher_step * w
        teacher = sum(n * k for _, n, k in self.teacher_points(step_counts)) * per_teacher_step * w
        students = sum(n * self.samples(n) for n in step_counts) * student_forwards * w
        images = (self.num_samples + sum(k for *_, k in self.teacher_points(step_counts))
                  + sum(self.samples(n) for n in step_counts)) * w
        return {"teacher_full": float(full), "teacher_baselines": float(teacher), "students": float(students),
                "extracted_images": float(images)}
