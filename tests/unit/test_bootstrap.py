"""FID from features and its paired-bootstrap intervals."""

import math

import numpy as np
import pytest
import torch
from torch_fidelity.metric_fid import fid_statistics_to_metric

from raypd.eval.bootstrap import Reference, across_seeds, fid, paired_bootstrap, withhold_biased


def _stats(x: torch.Tensor) -> dict:
    x = x.double().numpy()
    return {"mu": x.mean(axis=0), "sigma": np.cov(x, rowvar=False)}


def test_fid_is_torch_fidelitys_number():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(600, 32, generator=g) @ torch.randn(32, 32, generator=g)
    gen = torch.randn(500, 32, generator=g) @ torch.randn(32, 32, generator=g) + 0.3
    expected = fid_statistics_to_metric(_stats(gen), _stats(ref), False)["frechet_inception_distance"]
    assert fid(gen, Reference.of(ref)) == pytest.approx(expected, rel=1e-6)
    assert fid(ref, Reference.of(ref)) == pytest.approx(0.0, abs=1e-6)


def test_paired_intervals_cover_their_value_and_pairing_narrows_a_shared_statistic():
    g = torch.Generator().manual_seed(1)
    ref = Reference.of(torch.randn(2000, 8, generator=g))
    base = torch.randn(400, 8, generator=g)
    # two points that share their samples' noise, as samplers started from the same z do
    features = {"near": base + 0.2, "far": base * 1.5 + 0.6}
    ratio = {"ratio": lambda f: f["near"] / f["far"]}
    result = paired_bootstrap(features, ref, replicates=100, seed=0, statistics=ratio)
    for name, interval in result.items():
        assert interval.low <= interval.value <= interval.high, (name, interval)
        assert interval.low < interval.high
    assert result["ratio"].value == pytest.approx(result["near"].value / result["far"].value)
    # the same statistic from independently resampled points is much wider: the pairing is what is measured
    near = paired_bootstrap({"near": features["near"]}, ref, replicates=100, seed=0)["near"]
    far = paired_bootstrap({"far": features["far"]}, ref, replicates=100, seed=1)["far"]
    unpaired = (near.high / far.low) - (near.low / far.high)
    assert result["ratio"].high - result["ratio"].low < 0.5 * unpaired


def test_paired_bootstrap_refuses_unpaired_sets():
    ref = Reference.of(torch.randn(100, 4))
    with pytest.raises(ValueError, match="same samples"):
        paired_bootstrap({"a": torch.randn(50, 4), "b": torch.randn(60, 4)}, ref, replicates=10)
    with pytest.raises(ValueError, match="replicates"):
        paired_bootstrap({"a": torch.randn(50, 4)}, ref, replicates=1)


def test_across_seeds_is_the_mean_with_a_student_t_interval():
    interval = across_seeds([1.0, 2.0, 3.0])
    # sd 1 over 3 seeds, t(0.975, 2) = 4.303
    assert interval.value == pytest.approx(2.0)
    assert (interval.low, interval.high) == pytest.approx((2.0 - 4.303 / 3**0.5, 2.0 + 4.303 / 3**0.5), abs=1e-3)
    assert across_seeds([5.0, 5.0, float("nan")]).low == 5.0
    with pytest.raises(ValueError, match=">= 2"):
        across_seeds([1.0, float("nan")])
    # over many draws of five seeds, the 95% interval covers the true mean about 95% of the time
    g = torch.Generator().manual_seed(3)
    intervals = [across_seeds(torch.randn(5, generator=g).tolist()) for _ in range(400)]
    covered = [i.low <= 0.0 <= i.high for i in intervals]
    assert 0.91 <= sum(covered) / len(covered) <= 0.99


def test_in_high_dimension_resampled_fids_sit_far_from_fresh_draws():
    """Why the benchmark scores Inception features from several seeds: with about as many samples as features, a
    resample's repeated rows inflate its FID far beyond how much the FID moves between independent draws."""
    g = torch.Generator().manual_seed(4)
    d = n = 64
    ref = Reference.of(torch.randn(4000, d, generator=g))
    fresh = [fid(torch.randn(n, d, generator=g) + 0.1, ref) for _ in range(8)]
    spread = across_seeds(fresh)
    resampled = paired_bootstrap({"x": torch.randn(n, d, generator=g) + 0.1}, ref, replicates=40, seed=0)["x"]
    assert resampled.low > spread.high + 10 * (spread.high - spread.low)


def test_intervals_are_withheld_where_the_resampled_fids_miss_the_fid_itself():
    """With few features per sample the bootstrap's intervals stand; with about as many features as samples the
    resampled FIDs sit above the FID they resample, and every interval is withheld (the value kept)."""
    g = torch.Generator().manual_seed(6)

    def scored(d, n):
        ref = Reference.of(torch.randn(4000, d, generator=g))
        features = {"a": torch.randn(n, d, generator=g) + 0.3, "b": torch.randn(n, d, generator=g) + 0.6}
        stats = {"ratio": lambda f: f["a"] / f["b"]}
        return paired_bootstrap(features, ref, replicates=60, seed=0, statistics=stats)

    few = scored(4, 2000)
    kept, missed = withhold_biased(few, ["a", "b"])
    assert missed == [] and kept is few and kept["ratio"].low < kept["ratio"].value < kept["ratio"].high
    many = scored(64, 64)
    assert many["a"].low > many["a"].value  # the resamples' bias
    withheld, missed = withhold_biased(many, ["a", "b"])
    assert "a" in missed
    for name in ("a", "b", "ratio"):
        assert withheld[name].value == many[name].value
        assert math.isnan(withheld[name].low) and math.isnan(withheld[name].high)


def test_precision_tells_samples_off_the_data_and_recall_the_data_the_samples_miss():
    """torch-fidelity's k-NN precision and recall on a two-cluster reference: a sampler covering both clusters
    scores high on both; one collapsed onto a cluster keeps its precision and loses half its recall; one off
    the data loses its precision."""
    from raypd.eval.fid import Extractor, precision_recall

    g = torch.Generator().manual_seed(5)
    centres = torch.zeros(2, 8)
    centres[1, 0] = 20.0

    def draw(n, which):
        return centres[which] + torch.randn(n, 8, generator=g)

    ref = draw(400, torch.arange(400) % 2)
    inception = Extractor("inception", None)
    p, r = precision_recall(draw(400, torch.arange(400) % 2), ref, inception)
    assert p > 0.8 and r > 0.8
    p, r = precision_recall(draw(400, torch.zeros(400, dtype=torch.long)), ref, inception)
    assert p > 0.8 and 0.35 < r < 0.55
    p, _ = precision_recall(draw(400, torch.arange(400) % 2) + 6.0, ref, inception)
    assert p < 0.2
