"""How much an FID can be trusted: bootstrap intervals over the generated samples.

Every sampler raypd scores starts from the same noise, so sample i of the teacher's full sampler, of its
DDIM at N steps and of the student at N steps share their z. A *paired* bootstrap resamples those indices
once per replicate and applies the same draw to every point, so a ratio of FIDs (the share of the gap a
student closes) gets an interval that reflects how its terms move together. The reference statistics are
held fixed: they are the data set's own, the same for every point.

FID here is computed in float64 from the features, with the matrix square root's trace taken from the
eigenvalues of ``R^1/2 S R^1/2`` (``R`` the reference covariance, whose square root is computed once): the
same number torch-fidelity's ``sqrtm`` gives, at one symmetric eigen-solve per replicate and point.

The bootstrap is only as good as a resample is like a fresh draw. With few features per sample (the digit
classifier's 128 against 2,048 samples) it is. With Inception's 2,048 features and about as many samples,
a resample's repeated rows shrink its covariance's rank, the resampled FIDs sit far above the real one and
their spread is not the spread across fresh noise. There :func:`across_seeds` is the interval to state:
the same points scored again from independent noise seeds.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Reference:
    """The reference features' mean, covariance trace and covariance square root (float64)."""

    mean: Tensor
    trace: float
    root: Tensor

    @classmethod
    def of(cls, features: Tensor) -> "Reference":
        mean, cov = _moments(features.double())
        values, vectors = torch.linalg.eigh(cov)
        root = (vectors * values.clamp_min(0).sqrt()) @ vectors.T
        return cls(mean, float(cov.trace()), root)


def _moments(x: Tensor) -> tuple[Tensor, Tensor]:
    mean = x.mean(dim=0)
    centred = x - mean
    return mean, centred.T @ centred / (x.shape[0] - 1)


def fid(features: Tensor, reference: Reference) -> float:
    """The Frechet distance between Gaussians fitted to ``features`` [N, D] and to the reference."""
    mean, cov = _moments(features.double())
    product = reference.root @ cov @ reference.root
    cross = torch.linalg.eigvalsh((product + product.T) / 2).clamp_min(0).sqrt().sum()
    return float((mean - reference.mean).square().sum() + cov.trace() + reference.trace - 2 * cross)


@dataclass(frozen=True)
class Interval:
    value: float
    """The statistic on the full sample set."""
    low: float
    high: float
    """The central ``level`` bootstrap percentile interval."""
    level: float

    def __str__(self) -> str:
        return f"{self.value:.2f} [{self.low:.2f}, {self.high:.2f}]"


def paired_bootstrap(features: dict[str, Tensor], reference: Reference, *, replicates: int, seed: int = 0,
                     statistics=None, level: float = 0.95) -> dict[str, Interval]:
    """Intervals for each point's FID (and for ``statistics``: name -> f(fids by point) -> float, e.g. the gap
    closed), from ``replicates`` resamplings of the sample indices shared by every point."""
    if replicates < 2:
        raise ValueError(f"replicates must be >= 2, got {replicates}")
    sizes = {name: f.shape[0] for name, f in features.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"a paired bootstrap needs the same samples at every point; got sizes {sizes}")
    n = next(iter(sizes.values()))
    statistics = dict(statistics or {})
    full = {name: fid(f, reference) for name, f in features.items()}
    draws: dict[str, list[float]] = {name: [] for name in [*features, *statistics]}
    generator = torch.Generator().manual_seed(seed)
    for _ in range(replicates):
        index = torch.randint(0, n, (n,), generator=generator)
        fids = {name: fid(f[index], reference) for name, f in features.items()}
        for name, value in fids.items():
            draws[name].append(value)
        for name, stat in statistics.items():
            draws[name].append(stat(fids))
    values = {**full, **{name: stat(full) for name, stat in statistics.items()}}
    return {name: _interval(values[name], draws[name], level) for name in draws}


def _interval(value: float, draws: list[float], level: float) -> Interval:
    finite = sorted(d for d in draws if math.isfinite(d))
    if not finite:
        return Interval(value, float("nan"), float("nan"), level)
    tail = (1 - level) / 2
    pick = lambda q: finite[min(len(finite) - 1, max(0, round(q * (len(finite) - 1))))]  # noqa: E731
    return Interval(value, pick(tail), pick(1 - tail), level)


def withhold_biased(result: dict[str, Interval], fids: Iterable[str]) -> tuple[dict[str, Interval], list[str]]:
    """The bootstrap's intervals, or none at all where a resampled FID distribution misses its own FID: there the
    resamples' repeated rows (too few samples for the features' dimension) bias every FID upwards by more than
    the intervals are wide, so no interval from them means anything. Returns the intervals and the FIDs missed."""
    missed = [name for name in fids if not result[name].low <= result[name].value <= result[name].high]
    if not missed:
        return result, []
    return {name: Interval(iv.value, math.nan, math.nan, iv.level) for name, iv in result.items()}, missed


def across_seeds(values: list[float], level: float = 0.95) -> Interval:
    """A statistic measured once per independent noise seed: its mean, with the Student-t interval of that
    mean (``level``, ``len(values) - 1`` degrees of freedom). Needs two seeds or more."""
    from scipy import stats as scipy_stats  # scikit-learn brings scipy; imported here: only the benchmark asks

    finite = [v for v in values if math.isfinite(v)]
    if len(finite) < 2:
        raise ValueError(f"an interval across seeds needs >= 2 finite values, got {values}")
    k = len(finite)
    mean = sum(finite) / k
    sd = math.sqrt(sum((v - mean) ** 2 for v in finite) / (k - 1))
    half = float(scipy_stats.t.ppf(0.5 + level / 2, k - 1)) * sd / math.sqrt(k)
    return Interval(mean, mean - half, mean + half, level)
