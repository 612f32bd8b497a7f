"""Evaluate checkpoints: sample on the actor pool, extract features, compute metrics, record.

``evaluate_checkpoint`` runs one evaluation of one committed checkpoint into
``<run>/eval/<checkpoint>/<name>/`` (resumable: finished sample shards are kept); ``watch``
evaluates every committed checkpoint that has no ``metrics.json`` yet, polling for new ones.
State lives only in the run directory, so a restarted watcher skips what is done.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from evaluation.bpd import CheckpointModel, bits_per_dim
from evaluation.features import feature_layers
from evaluation.inception import ExtractorSource, resolve_feature_extractor
from evaluation.metrics import compute_metrics
from evaluation.model_sampling import CheckpointSampleFn, SamplerSettings
from evaluation.reference import ReferenceFeatures, ShardItem, features_of_shards, reference_features
from evaluation.report import (
    append_table,
    library_versions,
    plot_metrics,
    utc_now,
    write_metrics_json,
    write_tensorboard,
)
from evaluation.sampling import SampleFn, generate_samples, plan_shards, sample_seeds, shard_name, write_openai_npz
from pipeline.config import EvalConfig, ExperimentConfig
from pipeline.data import storage
from pipeline.diffusion.registry import sampler_spec
from pipeline.train.checkpoint import Checkpoint, committed_checkpoints, resolve_checkpoint

__all__ = ["EvalResult", "default_name", "evaluate_checkpoint", "evaluation_url", "pending_checkpoints", "watch"]

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
SEED_RULE = "sample i uses seed = evaluation.sampling.sample_seed(eval.seed, i) (numpy SeedSequence)"


@dataclass(frozen=True)
class EvalResult:
    url: str  # the evaluation folder
    record: dict[str, Any]  # what metrics.json holds

    @property
    def metrics(self) -> dict[str, Any]:
        return self.record["metrics"]


def default_name(cfg: EvalConfig, ema_rate: float) -> str:
    """A folder name that changes whenever the sample set would: sampler, steps, eta, guidance, N, EMA, seed."""
    eta = f"-eta{cfg.eta:g}" if "eta" in sampler_spec(cfg.sampler).options.model_fields and cfg.eta else ""
    guidance = f"-cfg{cfg.guidance_scale:g}" if cfg.guidance_scale else ""
    guidance += f"-cls{cfg.classifier_scale:g}" if cfg.classifier_scale else ""
    guidance += f"-class{cfg.class_label}" if cfg.class_label is not None else ""
    return f"{cfg.sampler}{cfg.steps}{eta}{guidance}-n{cfg.num_samples}-ema{ema_rate:g}-seed{cfg.seed}"


def sampler_settings(cfg: EvalConfig) -> SamplerSettings:
    """The sampler settings of the eval section (every field they share, by name)."""
    values = cfg.model_dump()
    return SamplerSettings(**{k: values[k] for k in SamplerSettings.__dataclass_fields__ if k in values})


def guidance_provenance(cfg: ExperimentConfig) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(metrics.json's ``guidance`` record, the classifier reference for the sampling workers).

    The classifier checkpoint is resolved once here, so every worker loads the same one.
    """
    ev = cfg.eval
    record: dict[str, Any] = {"guidance_scale": ev.guidance_scale, "classifier_scale": ev.classifier_scale,
                              "class_label": ev.class_label, "classifier": None,
                              "null_class": None, "label_dropout": cfg.diffusion.label_dropout}
    if ev.guidance_scale:
        record["null_class"] = int(resolve_model_classes(cfg))
    if not ev.classifier_scale:
        return record, None
    ckpt = resolve_checkpoint(ev.classifier_run, ev.classifier_checkpoint)
    rate = _ema_rate(EvalConfig(ema_rate=ev.classifier_ema_rate), ckpt)
    record["classifier"] = {"run": ev.classifier_run, "checkpoint": ckpt.rel, "images_seen": ckpt.images_seen,
                            "ema_rate": rate, "config_hash": ckpt.manifest.get("config_hash")}
    return record, {"run_url": ev.classifier_run, "checkpoint": ckpt.images_seen, "ema_rate": rate}


def resolve_model_classes(cfg: ExperimentConfig) -> int:
    from pipeline.models import resolve_preset

    return int(getattr(resolve_preset(cfg.model.preset, **dict(cfg.model.overrides)), "num_classes", 0) or 0)


def evaluation_url(run_url: str, checkpoint: Checkpoint, name: str) -> str:
    return storage.join(run_url, "eval", checkpoint.rel.rsplit("/", 1)[-1], name)


def _ema_rate(cfg: EvalConfig, checkpoint: Checkpoint) -> float:
    rates = [float(r) for r in checkpoint.manifest.get("ema", {}).get("rates", [])]
    if not rates:
        raise ValueError(f"checkpoint {checkpoint.rel} records no EMA rates")
    if cfg.ema_rate is None:
        return rates[0]
    if not any(abs(r - cfg.ema_rate) < 1e-12 for r in rates):
        raise ValueError(f"eval.ema_rate: {cfg.ema_rate!r} is not in checkpoint {checkpoint.rel}; it holds {rates}")
    return float(cfg.ema_rate)


def _describe(builder: Callable) -> str:
    """A stable name for a custom builder (no memory addresses, so resuming matches)."""
    target = builder if hasattr(builder, "__qualname__") else type(builder)
    return f"{getattr(target, '__module__', '?')}.{target.__qualname__}"


def _model_resolution(cfg: ExperimentConfig) -> int:
    from pipeline.models import resolve_preset

    return int(resolve_preset(cfg.model.preset, **dict(cfg.model.overrides)).image_size)


def _generated_features(out_url: str, cfg: EvalConfig, source: ExtractorSource, progress: bool,
                        ray_address: str | None) -> dict[str, np.ndarray]:
    """Features of the sample shards, cached beside them (keyed by extractor and weights)."""
    cache = storage.join(out_url, f"features-{source.name}-{source.sha256[:12]}.npz")
    if storage.exists(cache):
        with np.load(io.BytesIO(storage.read_bytes(cache))) as data:
            feats = {k: data[k] for k in data.files}
        if all(layer in feats for layer in feature_layers(source)) and len(feats["2048"]) == cfg.num_samples:
            return feats
    shards = plan_shards(cfg.num_samples, cfg.samples_per_shard)
    feats = features_of_shards(
        source, [ShardItem(storage.join(out_url, shard_name(s.index)), s.count) for s in shards],
        num_workers=cfg.num_workers, cpus_per_worker=cfg.cpus_per_worker, gpus_per_worker=cfg.gpus_per_worker,
        batch_size=cfg.batch_size,
        timeout_s=cfg.worker_timeout_s, progress="sample features" if progress else None, ray_address=ray_address,
    )
    buffer = io.BytesIO()
    np.savez(buffer, **feats)
    storage.write_bytes(cache, buffer.getvalue())
    return feats


def evaluate_checkpoint(
    cfg: ExperimentConfig,
    run_url: str,
    checkpoint: str | int = "latest",
    *,
    sample_fn_builder: Callable[[], SampleFn] | None = None,
    progress: bool = True,
    ray_address: str | None = None,
) -> EvalResult:
    """One evaluation of one committed checkpoint, as configured by ``cfg.eval``.

    ``sample_fn_builder`` replaces the default (the checkpoint's EMA network with the configured
    sampler), e.g. to evaluate another generator against the same reference.
    """
    ev = cfg.eval
    ckpt = resolve_checkpoint(run_url, checkpoint)
    ema_rate = _ema_rate(ev, ckpt)
    settings = sampler_settings(ev)
    guidance, classifier = guidance_provenance(cfg)
    name = ev.name or default_name(ev, ema_rate)
    out_url = evaluation_url(run_url, ckpt, name)
    model = cfg.model.model_dump(mode="json")
    diffusion = cfg.diffusion.model_dump(mode="json")
    device = "cuda" if ev.gpus_per_worker > 0 else "cpu"
    wanted = tuple(m for m in ev.metrics if m not in ("bpd", "probe"))
    timings: dict[str, float] = {}

    # Resolve the feature extractor first: a missing weights file fails before an hour of sampling.
    source = None
    if wanted:
        source = resolve_feature_extractor(ev.feature_extractor, ev.inception_weights,
                                           allow_download=ev.download_weights,
                                           download_timeout_s=ev.download_timeout_s)
    builder = sample_fn_builder or CheckpointSampleFn(run_url, ckpt.images_seen, ema_rate, model, diffusion,
                                                      settings, device, classifier)
    spec = {"checkpoint": ckpt.rel, "images_seen": ckpt.images_seen, "ema_rate": ema_rate,
            "sampler": settings.as_dict(), "model": model, "diffusion": diffusion,
            **({"classifier": guidance["classifier"]} if classifier else {}),
            "custom_sample_fn": None if sample_fn_builder is None else _describe(sample_fn_builder)}
    probe: dict[str, Any] = {}
    if "probe" in ev.metrics:  # linear probe of a representation model's EMA encoder (before sampling: fails fast)
        from evaluation.probe import probe_checkpoint

        start = time.perf_counter()
        probe = probe_checkpoint(cfg, run_url, ckpt.images_seen, ema_rate)
        timings["probe_s"] = time.perf_counter() - start
    start = time.perf_counter()
    generation = generate_samples(
        builder, out_url, ev.num_samples, eval_seed=ev.seed, batch_size=ev.batch_size,
        samples_per_shard=ev.samples_per_shard, num_workers=ev.num_workers, cpus_per_worker=ev.cpus_per_worker,
        gpus_per_worker=ev.gpus_per_worker, spec=spec, timeout_s=ev.worker_timeout_s, progress=progress,
        ray_address=ray_address,
    )
    timings["sampling_s"] = time.perf_counter() - start
    npz_url = write_openai_npz(out_url, ev.num_samples, ev.samples_per_shard) if ev.write_npz else None

    metrics: dict[str, Any] = dict(probe)
    skipped: dict[str, str] = {}
    reference: ReferenceFeatures | None = None
    reference_url = ev.reference_url or cfg.data.url
    if source is not None:
        if "is" in wanted and not source.has_logits:
            skipped["is"] = f"feature extractor {source.name} ({source.weights_path}) has no classifier logits"
            wanted = tuple(m for m in wanted if m != "is")
        start = time.perf_counter()
        if any(m in wanted for m in ("fid", "pr", "kid")):
            reference = reference_features(
                reference_url, source, ev.reference_cache, ev.reference_max_images,
                resolution=_model_resolution(cfg) if sample_fn_builder is None else None, num_workers=ev.num_workers,
                cpus_per_worker=ev.cpus_per_worker, gpus_per_worker=ev.gpus_per_worker, batch_size=ev.batch_size,
                timeout_s=ev.worker_timeout_s, progress=progress, ray_address=ray_address,
            )
        timings["reference_s"] = time.perf_counter() - start
        start = time.perf_counter()
        generated = _generated_features(out_url, ev, source, progress, ray_address)
        timings["features_s"] = time.perf_counter() - start
        start = time.perf_counter()
        metrics.update(compute_metrics(
            generated, reference.features if reference else {}, reference.stats if reference else None,
            metrics=wanted, pr_k=ev.pr_k, kid_subsets=ev.kid_subsets, kid_subset_size=ev.kid_subset_size,
            is_splits=ev.is_splits,
        ))
        timings["metrics_s"] = time.perf_counter() - start
    if "bpd" in ev.metrics:
        start = time.perf_counter()
        metrics.update(bits_per_dim(
            CheckpointModel(run_url, ckpt.images_seen, ema_rate, model, diffusion), ev.bpd_url or cfg.data.url,
            max_images=ev.bpd_max_images, eval_seed=ev.seed, batch_size=ev.batch_size, num_workers=ev.num_workers,
            cpus_per_worker=ev.cpus_per_worker, gpus_per_worker=ev.gpus_per_worker, timeout_s=ev.worker_timeout_s,
            progress=progress,
            ray_address=ray_address,
        ))
        timings["bpd_s"] = time.perf_counter() - start
    record = {
        "run": run_url,
        "checkpoint": {"name": ckpt.rel.rsplit("/", 1)[-1], "path": ckpt.rel, "images_seen": ckpt.images_seen,
                       "step": ckpt.manifest.get("step"), "config_hash": ckpt.manifest.get("config_hash")},
        "ema_rate": ema_rate,
        "name": name,
        "sampler": settings.as_dict() if sample_fn_builder is None else {"custom": _describe(sample_fn_builder)},
        "guidance": guidance if sample_fn_builder is None else None,
        "objective": diffusion["objective"],
        "num_samples": ev.num_samples,
        "seeds": {"eval_seed": ev.seed, "rule": SEED_RULE,
                  "first_seeds": [int(s) for s in sample_seeds(ev.seed, range(min(3, ev.num_samples)))]},
        "samples": {"url": out_url, "samples_per_shard": ev.samples_per_shard, "batch_size": ev.batch_size,
                    "num_workers": ev.num_workers, "shards_generated": len(generation.generated),
                    "shards_reused": len(generation.skipped), "npz": npz_url,
                    "images_per_second": generation.images_per_second},
        "reference": reference.provenance(reference_url) if reference else None,
        "feature_extractor": source.provenance() if source else None,
        "metric_settings": {"metrics": list(ev.metrics), "pr_k": ev.pr_k, "kid_subsets": ev.kid_subsets,
                            "kid_subset_size": ev.kid_subset_size, "is_splits": ev.is_splits,
                            "inception_layers": list(feature_layers(source)) if source else []},
        "metrics": metrics,
        "skipped": skipped,
        "timings": timings,
        "versions": library_versions(),
        "created_utc": utc_now(),
    }
    _record(run_url, out_url, record)
    return EvalResult(out_url, record)


def _record(run_url: str, out_url: str, record: dict[str, Any]) -> None:
    metrics = record["metrics"]
    images_seen = record["checkpoint"]["images_seen"]
    row = {"checkpoint": record["checkpoint"]["name"], "images_seen": images_seen, "name": record["name"],
           "num_samples": record["num_samples"], "created_utc": record["created_utc"],
           "feature_extractor": (record["feature_extractor"] or {}).get("feature_extractor"), **metrics}
    rows = append_table(storage.join(run_url, "eval", "metrics.tsv"), row)
    plot_metrics(rows, storage.join(run_url, "eval", "metrics.png"))
    scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not k.endswith("_count")}
    write_tensorboard(storage.join(run_url, "logs", "eval"), record["name"], images_seen, scalars)
    write_metrics_json(storage.join(out_url, METRICS_FILE), record)  # last: marks the evaluation done


def pending_checkpoints(cfg: ExperimentConfig, run_url: str) -> list[Checkpoint]:
    """Committed checkpoints that have no finished evaluation under the configured name."""
    out = []
    for ckpt in committed_checkpoints(run_url):
        name = cfg.eval.name or default_name(cfg.eval, _ema_rate(cfg.eval, ckpt))
        if not storage.exists(storage.join(evaluation_url(run_url, ckpt, name), METRICS_FILE)):
            out.append(ckpt)
    return out


def watch(
    cfg: ExperimentConfig,
    run_url: str,
    *,
    poll_s: float | None = None,
    once: bool = False,
    stop: threading.Event | None = None,
    on_result: Callable[[EvalResult], None] | None = None,
    progress: bool = True,
    ray_address: str | None = None,
) -> list[EvalResult]:
    """Evaluate each newly committed checkpoint of ``run_url`` exactly once, oldest first.

    Polls ``<run>/checkpoints`` every ``poll_s`` seconds (default ``cfg.eval.poll_s``) until
    ``stop`` is set; with ``once``, returns after evaluating what is pending now.
    """
    stop = stop or threading.Event()
    poll = cfg.eval.poll_s if poll_s is None else poll_s
    if poll <= 0:
        raise ValueError(f"poll_s: {poll!r} is not allowed; it must be > 0")
    results: list[EvalResult] = []
    while not stop.is_set():
        for ckpt in pending_checkpoints(cfg, run_url):
            if stop.is_set():
                break
            try:
                result = evaluate_checkpoint(cfg, run_url, ckpt.images_seen, progress=progress,
                                             ray_address=ray_address)
            except FileNotFoundError as exc:  # removed by retention while we worked on it
                if any(c.images_seen == ckpt.images_seen for c in committed_checkpoints(run_url)):
                    raise
                log.warning("checkpoint %s disappeared during its evaluation (%s); skipped", ckpt.rel, exc)
                continue
            results.append(result)
            if on_result is not None:
                on_result(result)
        if once:
            break
        stop.wait(poll)
    return results

