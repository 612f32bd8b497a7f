"""Linear probe of a learned representation (diffusion-based representation learning's metric).

The first ``max_images`` labelled images of a held-out dataset are split, by a permutation drawn
from ``seed``, into a fit part and a test part. Each representation (features of every image) is
standardised on the fit part and read by a multinomial logistic regression (scikit-learn's
``LogisticRegression``, L-BFGS, which is deterministic); its accuracy on the test part is reported
with a 95% Wilson score interval. Three representations are compared the same way:

- ``probe``: the trained (EMA) encoder's codes z = E_phi(x0);
- ``probe_random``: the same encoder architecture with random initial weights (PyTorch's default
  initialisation from ``seed``): what the architecture gives without training;
- ``probe_pca``: the pixels projected on their first d principal components (fitted on the fit
  part), d = the code dimension.

Images are read from the shards in-process (the encoder is small; reading is the cost), with the
same shard reader as the reference statistics (``evaluation.reference.read_shard_images``).
Everything is a function of (weights, dataset, max_images, seed, test_fraction), so the numbers
are reproducible.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from evaluation.model_sampling import from_uint8
from evaluation.reference import dataset_manifest, leading_shards, read_shard_images

__all__ = [
    "ProbeScore",
    "encode_images",
    "encoder_of",
    "labelled_images",
    "linear_probe",
    "pca_features",
    "probe_accuracy",
    "probe_checkpoint",
    "random_like",
    "split_indices",
    "wilson_interval",
]


def wilson_interval(correct: int, total: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (Wilson 1927; Brown, Cai & DasGupta 2001, eq. 4)."""
    if total < 1:
        raise ValueError(f"total: {total!r} is not allowed; it must be >= 1")
    p = correct / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z / (1 + z * z / total) * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total))
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class ProbeScore:
    accuracy: float
    ci_low: float
    ci_high: float
    count: int


def split_indices(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit, test) indices of ``n`` images from a permutation drawn from ``seed``."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction: {test_fraction!r} is not allowed; it must be in (0, 1)")
    order = np.random.default_rng([int(seed) & 0xFFFFFFFF, 0x9B0]).permutation(n)
    n_test = max(1, int(round(n * test_fraction)))
    return np.sort(order[n_test:]), np.sort(order[:n_test])


def probe_accuracy(features: np.ndarray, labels: np.ndarray, fit: np.ndarray, test: np.ndarray,
                   seed: int = 0) -> ProbeScore:
    """Accuracy on ``test`` of a logistic regression fitted on ``fit`` (features standardised on ``fit``)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    features = np.asarray(features, np.float64)
    if len(np.unique(labels[fit])) < 2:
        raise ValueError("probe: the fit split holds fewer than 2 classes; use more images (eval.probe_max_images)")
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000, random_state=int(seed)))
    clf.fit(features[fit], labels[fit])
    correct = int((clf.predict(features[test]) == labels[test]).sum())
    low, high = wilson_interval(correct, len(test))
    return ProbeScore(correct / len(test), low, high, len(test))


def pca_features(pixels: np.ndarray, fit: np.ndarray, dim: int) -> np.ndarray:
    """Every image's pixels (N, D) projected on the first ``dim`` principal components of the fit part."""
    from sklearn.decomposition import PCA

    pixels = np.asarray(pixels, np.float64)
    dim = min(int(dim), len(fit), pixels.shape[1])
    return PCA(n_components=dim, svd_solver="full").fit(pixels[fit]).transform(pixels)


@torch.no_grad()
def encode_images(encoder: nn.Module, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """(N, H, W, C) uint8 -> (N, d) codes of ``encoder`` (inputs scaled to [-1, 1], as in training)."""
    device = next(encoder.parameters()).device
    encoder = encoder.eval()
    out = []
    for lo in range(0, len(images), batch_size):
        out.append(encoder(from_uint8(images[lo:lo + batch_size], device)).double().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0))


def random_like(encoder: nn.Module, seed: int) -> nn.Module:
    """The same architecture with random initial weights (each layer's ``reset_parameters`` from ``seed``)."""
    fresh = copy.deepcopy(encoder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        for module in fresh.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    return fresh.eval()


def labelled_images(dataset_url: str, max_images: int, resolution: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The first ``max_images`` images of a prepared dataset with their labels (ValueError without labels)."""
    _, _, shards = dataset_manifest(dataset_url)
    images, labels = [], []
    for item in leading_shards(shards, max_images):
        if resolution:
            item = type(item)(item.url, item.limit, item.sha256, resolution)
        batch, batch_labels = read_shard_images(item)
        if len(batch) and batch_labels is None:
            raise ValueError(f"probe: {item.url} has no 'cls' labels; the linear probe needs a labelled dataset "
                             "(eval.probe_url, prepared from a source with classes)")
        images.append(batch)
        labels.append(batch_labels if batch_labels is not None else np.zeros(0, np.int64))
    if not images or sum(len(b) for b in images) < 4:
        raise ValueError(f"probe: {dataset_url} holds fewer than 4 images; the probe needs a fit and a test split")
    return np.concatenate(images)[:max_images], np.concatenate(labels)[:max_images]


def linear_probe(encoder: nn.Module, dataset_url: str, *, max_images: int = 2000, seed: int = 0,
                 test_fraction: float = 0.5, resolution: int | None = None,
                 batch_size: int = 256) -> dict[str, Any]:
    """Metrics ``probe_accuracy`` (trained encoder), ``probe_random_accuracy`` (random encoder) and
    ``probe_pca_accuracy`` (pixel PCA to d), each with ``*_ci_low``/``*_ci_high`` (95% Wilson)."""
    if max_images < 4:
        raise ValueError(f"eval.probe_max_images: {max_images!r} is not allowed; it must be >= 4")
    images, labels = labelled_images(dataset_url, max_images, resolution)
    fit, test = split_indices(len(images), test_fraction, seed)
    dim = int(encode_images(encoder, images[:1]).shape[1])
    pixels = images.reshape(len(images), -1).astype(np.float64) / 127.5 - 1
    features = {"probe": encode_images(encoder, images, batch_size),
                "probe_random": encode_images(random_like(encoder, seed), images, batch_size),
                "probe_pca": pca_features(pixels, fit, dim)}
    out: dict[str, Any] = {}
    for name, feats in features.items():
        score = probe_accuracy(feats, labels, fit, test, seed)
        out.update({f"{name}_accuracy": score.accuracy, f"{name}_ci_low": score.ci_low,
                    f"{name}_ci_high": score.ci_high})
    out.update({"probe_dim": dim, "probe_fit_count": int(len(fit)), "probe_test_count": int(len(test)),
                "probe_seed": int(seed)})
    return out


def encoder_of(objective: nn.Module, objective_name: str, t: float | None = None) -> nn.Module:
    """The encoder E_phi of a representation model's objective module as a function of x0 alone: a
    time-dependent encoder E_phi(x0, t) at diffusion time ``t`` in [0, 1] (ValueError for other objectives)."""
    encoder = getattr(objective, "encoder", None)
    if not isinstance(encoder, nn.Module):
        from pipeline.diffusion.registry import OBJECTIVES

        with_encoder = [n for n, s in OBJECTIVES.items() if s.view_type is not None and hasattr(s.view_type, "encode")]
        raise ValueError(f"eval.metrics: 'probe' is not allowed for objective {objective_name!r}, which has no "
                         f"encoder; allowed for: {', '.join(with_encoder)}")
    if getattr(objective, "time_dependent", False):
        if t is None:
            raise ValueError("eval.probe_t: None is not allowed for a time-dependent encoder; it needs a time in [0, 1]")
        return objective.encoder_at(t)
    return encoder


def probe_checkpoint(cfg, run_url: str, checkpoint: int, ema_rate: float | None) -> dict[str, Any]:
    """:func:`linear_probe` of the EMA encoder of a committed checkpoint, as ``cfg.eval`` configures it,
    on images at the model's resolution (as training saw them).

    A time-dependent encoder E_phi(x0, t) is probed at one diffusion time, ``eval.probe_t`` (mapped to
    the network's time input as in training: the DDPM timestep round(t (T - 1)), or the SDE's
    noise input at t); it is recorded as ``probe_t``. What such a code keeps depends on t (the
    noisier x_t, the coarser the detail the network needs from it), so t is a per-run choice here
    (default 0.5, mid-trajectory) and runs compare at the same ``probe_t``. A Gaussian encoder is
    probed by its mean mu.
    """
    from pipeline.loading import load_checkpoint_model

    ev = cfg.eval
    device = "cuda" if ev.gpus_per_worker > 0 and torch.cuda.is_available() else "cpu"
    model = load_checkpoint_model(run_url, checkpoint, ema_rate, config=cfg, device=device)
    encoder = encoder_of(model.objective, cfg.diffusion.objective, ev.probe_t)
    out = linear_probe(encoder, ev.probe_url or cfg.data.url, max_images=ev.probe_max_images, seed=ev.seed,
                       test_fraction=ev.probe_test_fraction, resolution=int(model.network.config.image_size),
                       batch_size=ev.batch_size)
    if getattr(model.objective, "time_dependent", False):
        out["probe_t"] = float(ev.probe_t)
    return out
