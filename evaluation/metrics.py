"""Sample-quality metrics as pure functions over Inception / DINOv2 features (no I/O, no networks).

Each metric delegates its arithmetic to torch-fidelity's own feature-level function, so a number
here is the number torch-fidelity would report for the same features; this module only fixes
the conventions (which features, which order, float64) in one place.

Conventions: ``generated`` first, ``reference`` (real data) second, as in torch-fidelity.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch_fidelity.metric_fid import fid_statistics_to_metric
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric
from torch_fidelity.metric_prc import prc_features_to_metric

__all__ = [
    "DINOV2",
    "METRIC_NAMES",
    "SPATIAL",
    "FeatureStatistics",
    "compute_metrics",
    "feature_statistics",
    "frechet_distance",
    "frechet_distance_of_features",
    "inception_score",
    "kernel_inception_distance",
    "precision_recall",
]

METRIC_NAMES = ("fid", "sfid", "is", "pr", "kid", "fd_dinov2")
POOL = "2048"  # pool3 features: FID, KID, precision/recall
LOGITS = "logits_unbiased"  # Inception Score
SPATIAL = "mixed_6_conv"  # sFID (Nash et al. 2021): first 7 channels of mixed_6/conv, 7 x 17 x 17 = 2023
DINOV2 = "dinov2"  # FD-DINOv2 (Stein et al. 2023): CLS token of DINOv2 ViT-L/14
FRECHET_LAYERS = {"fid": POOL, "sfid": SPATIAL, "fd_dinov2": DINOV2}  # Frechet distances and their features


@dataclass(frozen=True)
class FeatureStatistics:
    """Mean and covariance of a feature set (what FID needs), with the sample count."""

    mu: np.ndarray  # (D,) float64
    sigma: np.ndarray  # (D, D) float64
    count: int

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"mu": self.mu, "sigma": self.sigma, "count": np.asarray(self.count)}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> FeatureStatistics:
        return cls(np.asarray(arrays["mu"], np.float64), np.asarray(arrays["sigma"], np.float64), int(arrays["count"]))


def _check_features(name: str, features: np.ndarray, min_count: int = 2) -> np.ndarray:
    features = np.asarray(features)
    if features.ndim != 2 or features.shape[0] < min_count:
        raise ValueError(f"{name}: expected a (N, D) feature array with N >= {min_count}, got shape {features.shape}")
    if not np.all(np.isfinite(features)):
        raise ValueError(f"{name}: features contain NaN or infinity")
    return features.astype(np.float64, copy=False)


def feature_statistics(features: np.ndarray) -> FeatureStatistics:
    """Sample mean and unbiased sample covariance (Heusel et al. 2017, sec. 3: the Gaussian fitted to features)."""
    features = _check_features("features", features)
    return FeatureStatistics(features.mean(axis=0), np.cov(features, rowvar=False), int(features.shape[0]))


def frechet_distance(generated: FeatureStatistics, reference: FeatureStatistics) -> float:
    """FID (Heusel et al. 2017, eq. 6): |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))."""
    if generated.mu.shape != reference.mu.shape:
        raise ValueError(f"frechet_distance: feature sizes differ: {generated.mu.shape} vs {reference.mu.shape}")
    stats_1 = {"mu": generated.mu.astype(np.float64), "sigma": np.atleast_2d(generated.sigma).astype(np.float64)}
    stats_2 = {"mu": reference.mu.astype(np.float64), "sigma": np.atleast_2d(reference.sigma).astype(np.float64)}
    return float(fid_statistics_to_metric(stats_1, stats_2, verbose=False)["frechet_inception_distance"])


def frechet_distance_of_features(generated: np.ndarray, reference: np.ndarray) -> float:
    """FID of two feature sets; exact low-rank form when both sets are smaller than the dimension.

    With centred features X1 (n1 x D), X2 (n2 x D) and S_i = X_i^T X_i / (n_i - 1), the nonzero
    eigenvalues of S1 S2 are those of the n1 x n1 matrix M M^T / ((n1 - 1)(n2 - 1)), M = X1 X2^T,
    so tr (S1 S2)^(1/2) = sum of singular values of M / sqrt((n1 - 1)(n2 - 1)) (eq. 6 unchanged).
    That replaces a D x D eigenproblem by an n1 x n2 SVD; larger sets use :func:`frechet_distance`.
    """
    generated = _check_features("fid generated", generated)
    reference = _check_features("fid reference", reference)
    (n1, d), (n2, d2) = generated.shape, reference.shape
    if d != d2:
        raise ValueError(f"frechet_distance: feature sizes differ: {d} vs {d2}")
    if max(n1, n2) > d:
        return frechet_distance(feature_statistics(generated), feature_statistics(reference))
    x1, x2 = generated - generated.mean(axis=0), reference - reference.mean(axis=0)
    c1, c2 = n1 - 1, n2 - 1
    diff = generated.mean(axis=0) - reference.mean(axis=0)
    tr_covmean = np.linalg.svd(x1 @ x2.T, compute_uv=False).sum() / np.sqrt(c1 * c2)
    return float(diff @ diff + np.sum(x1 * x1) / c1 + np.sum(x2 * x2) / c2 - 2 * tr_covmean)


def inception_score(logits: np.ndarray, splits: int = 10, seed: int = 2020) -> tuple[float, float]:
    """IS (Salimans et al. 2016, sec. 4): exp(E_x KL(p(y|x) || p(y))), mean and std over ``splits``."""
    logits = _check_features("inception_score logits", logits, min_count=splits)
    out = isc_features_to_metric(torch.from_numpy(logits), splits=splits, shuffle=True, rng_seed=seed)
    return float(out["inception_score_mean"]), float(out["inception_score_std"])


def kernel_inception_distance(
    generated: np.ndarray, reference: np.ndarray, subsets: int = 100, subset_size: int = 1000, seed: int = 2020
) -> tuple[float, float]:
    """KID (Binkowski et al. 2018, eq. 2 with the cubic kernel (x.y/d + 1)^3): unbiased MMD^2 over subsets.

    ``subset_size`` is clipped to the smaller set, since torch-fidelity refuses a larger one.
    """
    generated = _check_features("kid generated", generated)
    reference = _check_features("kid reference", reference)
    size = min(subset_size, generated.shape[0], reference.shape[0])
    out = kid_features_to_metric(
        torch.from_numpy(generated),
        torch.from_numpy(reference),
        kid_subsets=subsets,
        kid_subset_size=size,
        kid_kernel="poly",
        kid_kernel_poly_degree=3,
        kid_kernel_poly_gamma=None,
        kid_kernel_poly_coef0=1,
        rng_seed=seed,
        verbose=False,
    )
    return float(out["kernel_inception_distance_mean"]), float(out["kernel_inception_distance_std"])


def precision_recall(generated: np.ndarray, reference: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019, eq. 1-2): k-NN balls of each manifold."""
    if k < 1:
        raise ValueError(f"precision_recall: k={k!r} is not allowed; k must be >= 1")
    generated = _check_features("precision_recall generated", generated, min_count=k + 1)
    reference = _check_features("precision_recall reference", reference, min_count=k + 1)
    out = prc_features_to_metric(
        torch.from_numpy(generated.astype(np.float32)),
        torch.from_numpy(reference.astype(np.float32)),
        prc_neighborhood=k,
        prc_batch_size=10_000,
        save_cpu_ram=True,
        verbose=False,
    )
    return float(out["precision"]), float(out["recall"])


def _frechet_of_layer(
    layer: str, generated: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray],
    reference_stats: Mapping[str, FeatureStatistics],
) -> float:
    """Heusel et al. eq. 6 on one feature layer: exact low-rank form for small sets, else statistics."""
    if layer not in generated:
        raise ValueError(f"metrics: generated features have no '{layer}' layer (have {sorted(generated)})")
    gen = np.asarray(generated[layer])
    if layer in reference and max(len(gen), len(reference[layer])) <= gen.shape[1]:
        return frechet_distance_of_features(gen, reference[layer])
    if layer not in reference_stats and layer not in reference:
        raise ValueError(f"metrics: the Frechet distance on '{layer}' needs reference features or statistics")
    ref_stats = reference_stats[layer] if layer in reference_stats else feature_statistics(reference[layer])
    return frechet_distance(feature_statistics(gen), ref_stats)


def compute_metrics(
    generated: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray],
    reference_stats: FeatureStatistics | Mapping[str, FeatureStatistics] | None = None,
    metrics: tuple[str, ...] = METRIC_NAMES,
    pr_k: int = 3,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    is_splits: int = 10,
    seed: int = 2020,
) -> dict[str, float]:
    """All requested metrics from one pass of features per network.

    ``generated`` holds ``"2048"`` (pool3), for sFID ``"mixed_6_conv"``, for IS
    ``"logits_unbiased"``, for FD-DINOv2 ``"dinov2"``; ``reference`` holds the same layers'
    features or, for the Frechet distances alone, ``reference_stats`` (cached mean and
    covariance per layer; a bare :class:`FeatureStatistics` is the pool3 one).
    """
    unknown = [m for m in metrics if m not in METRIC_NAMES]
    if unknown:
        raise ValueError(f"metrics: {unknown} not allowed; allowed: {', '.join(METRIC_NAMES)}")
    if isinstance(reference_stats, FeatureStatistics):
        reference_stats = {POOL: reference_stats}
    reference_stats = dict(reference_stats or {})
    out: dict[str, float] = {}
    for metric, layer in FRECHET_LAYERS.items():
        if metric in metrics:
            out[metric] = _frechet_of_layer(layer, generated, reference, reference_stats)
    if "is" in metrics:
        if LOGITS not in generated:
            raise ValueError("metrics: 'is' needs Inception logits, which this feature extractor does not provide")
        splits = min(is_splits, len(generated[LOGITS]))
        out["is"], out["is_std"] = inception_score(generated[LOGITS], splits=splits, seed=seed)
    if "pr" in metrics:
        out["precision"], out["recall"] = precision_recall(generated[POOL], reference[POOL], k=pr_k)
    if "kid" in metrics:
        out["kid"], out["kid_std"] = kernel_inception_distance(
            generated[POOL], reference[POOL], subsets=kid_subsets, subset_size=kid_subset_size, seed=seed
        )
    return out
