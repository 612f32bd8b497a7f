"""Percentile bootstrap intervals over the generated samples for FID, sFID, FD-DINOv2, P/R and KID.

Every metric is recomputed on ``resamples`` sets drawn with replacement from the generated
samples (the reference set is held fixed: it is the population the model is compared with), and
the interval is the (1 - level) / 2 and (1 + level) / 2 quantiles of those values: the
percentile interval (Efron & Tibshirani 1993, eq. 13.5). All metrics use the same resamples
(paired), drawn from ``seed`` alone, so an interval is reproducible.

A resample is a vector of counts (how often each generated sample is drawn), which lets the
Frechet distance use weighted moments (no copy of the features) and a factor of the reference
covariance computed once; precision and recall keep each sample's k-NN radius from the full sets
(a resample repeats samples, and a repeated sample would otherwise be its own neighbour).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch_fidelity.metric_prc import calc_cdist_part

from evaluation.metrics import (
    FRECHET_LAYERS,
    POOL,
    FeatureStatistics,
    _check_features,
    feature_statistics,
    kernel_inception_distance,
)

__all__ = ["BOOTSTRAPPED", "FixedReference", "Interval", "bootstrap_counts", "bootstrap_intervals",
           "fixed_reference", "fixed_reference_of_features", "frechet_distance_to_fixed_reference", "k_nn_radii",
           "percentile_interval", "precision_recall_of_counts"]

BOOTSTRAPPED = ("fid", "sfid", "fd_dinov2", "precision", "recall", "kid")


@dataclass(frozen=True)
class Interval:
    low: float
    high: float
    level: float
    resamples: int
    seed: int

    def as_dict(self) -> dict:
        return {"low": self.low, "high": self.high, "level": self.level, "resamples": self.resamples,
                "seed": self.seed, "method": "percentile bootstrap over generated samples"}


def bootstrap_counts(n: int, resamples: int, seed: int) -> np.ndarray:
    """(resamples, n) counts: resample b draws sample i counts[b, i] times (n draws with replacement)."""
    rng = np.random.default_rng(seed)
    return np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(resamples)])


def percentile_interval(values: np.ndarray, level: float) -> tuple[float, float]:
    """Efron & Tibshirani 1993, eq. 13.5: the alpha/2 and 1 - alpha/2 quantiles of the bootstrap values."""
    if not 0 < level < 1:
        raise ValueError(f"bootstrap level {level!r} is not allowed; it must lie in (0, 1)")
    alpha = 1.0 - level
    low, high = np.quantile(np.asarray(values, np.float64), [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


@dataclass(frozen=True)
class FixedReference:
    mu: np.ndarray
    trace: float
    factor: np.ndarray  # L (D x r) with S_ref = L L^T


def fixed_reference(stats: FeatureStatistics) -> FixedReference:
    """The reference Gaussian with a factor of its covariance, from its statistics (a D x D eigenproblem)."""
    w, v = np.linalg.eigh((stats.sigma + stats.sigma.T) / 2)
    keep = w > 0
    return FixedReference(stats.mu, float(np.trace(stats.sigma)), v[:, keep] * np.sqrt(w[keep]))


def fixed_reference_of_features(features: np.ndarray) -> FixedReference:
    """The same from the reference features themselves: S_ref = Xc^T Xc / (m - 1), so L = Xc^T / sqrt(m - 1)
    (no eigenproblem; the cheap form when the reference set is smaller than the dimension)."""
    x = np.asarray(features, np.float64)
    xc = (x - x.mean(axis=0)) / np.sqrt(x.shape[0] - 1)
    return FixedReference(x.mean(axis=0), float(np.sum(xc * xc)), xc.T)


def frechet_distance_to_fixed_reference(
    features: np.ndarray, counts: np.ndarray, ref: FixedReference, projected: np.ndarray | None = None
) -> float:
    """FID (Heusel et al. 2017, eq. 6) of the count-weighted generated set against a fixed reference.

    With S2 = L L^T, the eigenvalues of S1 S2 are those of L^T S1 L = Yc^T Yc for the weighted,
    centred projections Yc = sqrt(c / (n - 1)) (X L - mean), so tr (S1 S2)^(1/2) is the sum of the
    square roots of the eigenvalues of Yc Yc^T (n x n) or Yc^T Yc (r x r), whichever is smaller.
    S1 is the unbiased covariance of the resample, n = sum(counts). ``projected`` = X L, computed
    once for many resamples.
    """
    x = np.asarray(features, np.float64)
    y = x @ ref.factor if projected is None else projected
    counts = np.asarray(counts, np.float64)
    keep = counts > 0
    x, y, w = x[keep], y[keep], counts[keep]
    n = w.sum()
    mu = w @ x / n
    tr_sigma = float(w @ np.sum((x - mu) ** 2, axis=1) / (n - 1))
    yc = (y - w @ y / n) * np.sqrt(w / (n - 1))[:, None]
    gram = yc @ yc.T if yc.shape[0] <= yc.shape[1] else yc.T @ yc  # same nonzero eigenvalues
    tr_covmean = float(np.sqrt(np.clip(np.linalg.eigvalsh(gram), 0, None)).sum())
    diff = mu - ref.mu
    return float(diff @ diff + tr_sigma + ref.trace - 2 * tr_covmean)


def k_nn_radii(features: torch.Tensor, k: int, batch_size: int = 10_000) -> torch.Tensor:
    """Distance of each sample to its k-th nearest other sample (Kynkaanniemi et al. 2019, eq. 1's ball)."""
    return torch.cat([calc_cdist_part(part, features, batch_size).kthvalue(k + 1).values
                      for part in features.split(batch_size)])


def precision_recall_of_counts(
    generated: np.ndarray, reference: np.ndarray, counts: np.ndarray, k: int = 3, block: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """Improved precision and recall (Kynkaanniemi et al. 2019, eq. 1-2) of count-weighted generated sets.

    ``counts`` is (B, n); returns (B,) precisions and (B,) recalls. Each ball keeps the k-NN radius of
    its full set. With all counts 1 this is torch-fidelity's precision and recall.
    """
    gen = torch.from_numpy(np.asarray(generated, np.float32))
    real = torch.from_numpy(np.asarray(reference, np.float32))
    weights = torch.from_numpy(np.asarray(counts, np.float32)).T  # (n, B)
    n = gen.shape[0]
    gen_radii, real_radii = k_nn_radii(gen, k), k_nn_radii(real, k)
    in_real = torch.cat([(calc_cdist_part(part, real) <= real_radii).any(dim=1).float() for part in gen.split(block)])
    precision = (in_real @ weights) / n  # eq. 1: share of generated samples inside some real ball
    covered = torch.zeros(weights.shape[1])
    for part in real.split(block):  # eq. 2: share of real samples inside some drawn generated ball
        inside = (calc_cdist_part(part, gen) <= gen_radii).float()
        covered += ((inside @ weights) > 0).float().sum(dim=0)
    return precision.double().numpy(), (covered / real.shape[0]).double().numpy()


def bootstrap_intervals(
    generated: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray],
    reference_stats: Mapping[str, FeatureStatistics],
    metrics: tuple[str, ...],
    resamples: int = 100,
    seed: int = 0,
    level: float = 0.95,
    pr_k: int = 3,
    kid_subsets: int = 10,
    kid_subset_size: int = 1000,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Interval]:
    """Bootstrap intervals of the requested metrics (``metrics`` as in :func:`compute_metrics`)."""
    if resamples < 2:
        raise ValueError(f"bootstrap resamples {resamples!r} is not allowed; it must be >= 2 (0 disables intervals)")
    n = len(next(iter(generated.values())))
    counts = bootstrap_counts(n, resamples, seed)
    out: dict[str, Interval] = {}

    def interval(values) -> Interval:
        return Interval(*percentile_interval(values, level), level=level, resamples=resamples, seed=seed)

    for metric, layer in FRECHET_LAYERS.items():
        if metric not in metrics:
            continue
        if progress:
            progress(metric)
        feats = _check_features(f"{metric} generated", generated[layer])
        if layer in reference and len(reference[layer]) <= feats.shape[1]:
            ref = fixed_reference_of_features(reference[layer])
        else:
            ref = fixed_reference(reference_stats.get(layer) or feature_statistics(reference[layer]))
        projected = feats @ ref.factor
        out[metric] = interval([frechet_distance_to_fixed_reference(feats, c, ref, projected) for c in counts])
    if "pr" in metrics:
        if progress:
            progress("pr")
        precision, recall = precision_recall_of_counts(generated[POOL], reference[POOL], counts, k=pr_k)
        out["precision"], out["recall"] = interval(precision), interval(recall)
    if "kid" in metrics:
        if progress:
            progress("kid")
        gen = np.asarray(generated[POOL])
        values = [kernel_inception_distance(np.repeat(gen, c, axis=0), reference[POOL], subsets=kid_subsets,
                                            subset_size=kid_subset_size, seed=seed + b)[0]
                  for b, c in enumerate(counts)]
        out["kid"] = interval(values)
    return out
