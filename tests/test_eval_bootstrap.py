"""Bootstrap intervals over the generated samples: coverage on Gaussian features with a known FID,
parity of the resample formulas with torch-fidelity, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from evaluation.bootstrap import (
    bootstrap_counts,
    bootstrap_intervals,
    fixed_reference,
    fixed_reference_of_features,
    frechet_distance_to_fixed_reference,
    percentile_interval,
    precision_recall_of_counts,
)
from evaluation.metrics import FeatureStatistics, feature_statistics, frechet_distance, precision_recall


def test_bootstrap_fid_interval_covers_the_true_fid_at_the_nominal_rate():
    """Generated features ~ N(m1, S1), the reference is the population N(m2, S2) itself, so the true FID
    is closed-form (commuting covariances: |m1 - m2|^2 + sum (sqrt(a) - sqrt(b))^2). Over T independent
    generated sets the 90% percentile interval must cover it in ~90% of the sets. The number of
    covering sets is Binomial(T, p) if the interval is right; we accept |rate - 0.9| <= 3 sd with
    sd = sqrt(0.9 * 0.1 / T) (T = 200: sd = 0.021, so 0.836 ... 0.964)."""
    rng = np.random.default_rng(0)
    d, n, trials, level = 2, 400, 200, 0.9
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    a, b = np.array([1.0, 0.5]), np.array([0.6, 1.5])
    m1, m2 = np.array([1.0, 0.0]), np.zeros(d)
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    true_fid = float(np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2))
    population = {"2048": FeatureStatistics(m2, s2, 10**9)}
    covered = 0
    for t in range(trials):
        x = rng.multivariate_normal(m1, s1, size=n)
        iv = bootstrap_intervals({"2048": x}, {}, population, ("fid",), resamples=200, seed=t, level=level)["fid"]
        covered += iv.low <= true_fid <= iv.high
    rate = covered / trials
    sd = np.sqrt(level * (1 - level) / trials)
    assert abs(rate - level) <= 3 * sd, f"coverage {rate:.3f} vs nominal {level} (3 sd = {3 * sd:.3f})"


@pytest.mark.parametrize("n, m", [(20, 500), (300, 500), (20, 30), (300, 30)])  # n, m below / above D
def test_fixed_reference_frechet_distance_equals_torch_fidelity_on_the_resampled_set(n, m):
    rng = np.random.default_rng(1)
    d = 48
    x = rng.standard_normal((n, d)) * rng.uniform(0.5, 2, d) + 0.2
    ref_feats = rng.standard_normal((m, d)) @ rng.standard_normal((d, d)) * 0.3
    ref = feature_statistics(ref_feats)
    fixed = fixed_reference(ref) if m > d else fixed_reference_of_features(ref_feats)
    ones = np.ones(n, np.int64)
    assert frechet_distance_to_fixed_reference(x, ones, fixed) == pytest.approx(
        frechet_distance(feature_statistics(x), ref), rel=1e-7)
    counts = bootstrap_counts(n, 3, seed=5)
    for c in counts:  # a resample = the set with sample i repeated c[i] times
        expected = frechet_distance(feature_statistics(np.repeat(x, c, axis=0)), ref)
        assert frechet_distance_to_fixed_reference(x, c, fixed) == pytest.approx(expected, rel=1e-7)


def test_precision_recall_of_counts_matches_torch_fidelity():
    rng = np.random.default_rng(2)
    gen = rng.standard_normal((120, 16)) + 0.4
    real = rng.standard_normal((100, 16))
    counts = np.vstack([np.ones(120, np.int64), bootstrap_counts(120, 4, seed=3)])
    precision, recall = precision_recall_of_counts(gen, real, counts, k=3, block=37)
    p, r = precision_recall(gen, real, k=3)
    assert precision[0] == pytest.approx(p, abs=1e-12) and recall[0] == pytest.approx(r, abs=1e-12)
    assert 0 < p < 1 and 0 < r < 1
    for c, got in zip(counts[1:], precision[1:]):  # precision depends on the real balls only: exact
        assert got == pytest.approx(precision_recall(np.repeat(gen, c, axis=0), real, k=3)[0], abs=1e-12)
    assert np.all((recall >= 0) & (recall <= 1)) and len(set(recall.round(9))) > 1


def test_intervals_are_deterministic_given_the_seed_and_cover_every_metric():
    rng = np.random.default_rng(3)
    gen = {"2048": rng.standard_normal((60, 8)) + 0.3, "mixed_6_conv": rng.standard_normal((60, 5)),
           "dinov2": rng.standard_normal((60, 6))}
    ref = {"2048": rng.standard_normal((50, 8)), "dinov2": rng.standard_normal((50, 6))}
    stats = {"mixed_6_conv": feature_statistics(rng.standard_normal((70, 5)))}
    metrics = ("fid", "sfid", "pr", "kid", "fd_dinov2")
    kw = {"resamples": 20, "level": 0.8, "kid_subsets": 3, "kid_subset_size": 20}
    one = bootstrap_intervals(gen, ref, stats, metrics, seed=7, **kw)
    two = bootstrap_intervals(gen, ref, stats, metrics, seed=7, **kw)
    other = bootstrap_intervals(gen, ref, stats, metrics, seed=8, **kw)
    assert set(one) == {"fid", "sfid", "precision", "recall", "kid", "fd_dinov2"}
    assert one == two and one["fid"] != other["fid"]
    for iv in one.values():
        assert iv.low <= iv.high and iv.level == 0.8 and iv.resamples == 20


def test_percentile_interval_and_bad_settings():
    values = np.arange(1001, dtype=float)
    assert percentile_interval(values, 0.9) == pytest.approx((50.0, 950.0))
    with pytest.raises(ValueError, match="level"):
        percentile_interval(values, 1.0)
    with pytest.raises(ValueError, match="resamples"):
        bootstrap_intervals({"2048": np.zeros((5, 2))}, {"2048": np.zeros((5, 2))}, {}, ("fid",), resamples=1)
    counts = bootstrap_counts(10, 4, seed=0)
    assert counts.shape == (4, 10) and np.all(counts.sum(axis=1) == 10)
    np.testing.assert_array_equal(counts, bootstrap_counts(10, 4, seed=0))
