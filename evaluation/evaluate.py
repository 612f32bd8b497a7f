"""Evaluate checkpoints: sample on the actor pool, extract features, compute metrics, record.

``evaluate_checkpoint`` runs one evaluation of one committed checkpoint into
``<run>/eval/<checkpoint>/<name>/`` (resumable: finished sample shards are kept); ``watch``
evaluates every committed checkpoint that has no ``metrics.json`` yet, polling for new ones.
State lives only in the run directory, so a restarted watcher skips what is done.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from evaluation.bpd import CheckpointModel, bits_per_dim
from evaluation.features import feature_layers
from evaluation.model_sampling import CheckpointSampleFn, SamplerSettings
from evaluation.report import (
    append_table,
    interval_columns,
    library_versions,
    plot_metrics,
    utc_now,
    write_metrics_json,
    write_tensorboard,
)
from evaluation.sampling import SampleFn, generate_samples, sample_seeds, write_openai_npz
from evaluation.scoring import resolve_sources, score_samples
from pipeline.config import EvalConfig, ExperimentConfig
from pipeline.data import storage
from pipeline.diffusion.registry import sampler_spec, steps_used
from pipeline.train.checkpoint import Checkpoint, committed_checkpoints, resolve_checkpoint

__all__ = ["EvalResult", "default_name", "evaluate_checkpoint", "evaluate_posthoc_sweep", "evaluation_url",
           "pending_checkpoints", "watch"]

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


def default_name(cfg: EvalConfig, ema_rate: float | None, posthoc_sigma: float | None = None) -> str:
    """A folder name that changes whenever the sample set would: sampler, steps, eta, guidance, N, EMA
    (or post-hoc EMA length), seed, the cascade's second stage."""
    eta = f"-eta{cfg.eta:g}" if "eta" in sampler_spec(cfg.sampler).options.model_fields and cfg.eta else ""
    guidance = f"-cfg{cfg.guidance_scale:g}" if cfg.guidance_scale else ""
    guidance += f"-cls{cfg.classifier_scale:g}" if cfg.classifier_scale else ""
    guidance += f"-class{cfg.class_label}" if cfg.class_label is not None else ""
    ema = f"phema{posthoc_sigma:g}" if posthoc_sigma is not None else f"ema{ema_rate:g}"
    stages = ""  # short hashes of the unCLIP prior's and the cascade's second stage's settings
    if cfg.prior_run:
        stages += "-prior" + _short_hash([cfg.prior_run, cfg.prior_checkpoint, cfg.prior_steps, cfg.prior_guidance_scale,
                                          cfg.clip_model, cfg.clip_weights, cfg.prompts_url, cfg.prompts_max])
    if cfg.upsampler_run:
        stages += "-up" + _short_hash([cfg.upsampler_run, cfg.upsampler_checkpoint, cfg.upsampler_ema_rate,
                                       cfg.upsampler_sampler, cfg.upsampler_steps, cfg.upsampler_noise_level])
    return f"{cfg.sampler}{cfg.steps}{eta}{guidance}-n{cfg.num_samples}-{ema}-seed{cfg.seed}{stages}"


def _short_hash(fields: list[Any]) -> str:
    return hashlib.sha256(json.dumps(fields).encode()).hexdigest()[:8]


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
                            "ema_rate": rate, "config_hash": ckpt.config_hash}
    return record, {"run_url": ev.classifier_run, "checkpoint": ckpt.images_seen, "ema_rate": rate}


def resolve_model_classes(cfg: ExperimentConfig) -> int:
    from pipeline.models import resolve_preset

    return int(getattr(resolve_preset(cfg.model.preset, **dict(cfg.model.overrides)), "num_classes", 0) or 0)


def evaluation_url(run_url: str, checkpoint: Checkpoint, name: str) -> str:
    return storage.join(run_url, "eval", checkpoint.rel.rsplit("/", 1)[-1], name)


def _ema_rate(cfg: EvalConfig, checkpoint: Checkpoint) -> float:
    rates = checkpoint.ema_rates
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


def resolve_model_resolution(cfg: ExperimentConfig) -> int:
    from pipeline.models import resolve_preset

    return int(resolve_preset(cfg.model.preset, **dict(cfg.model.overrides)).image_size)


def evaluate_checkpoint(
    cfg: ExperimentConfig,
    run_url: str,
    checkpoint: str | int = "latest",
    *,
    sample_fn_builder: Callable[[], SampleFn] | None = None,
    progress: bool = True,
    ray_address: str | None = None,
    posthoc_sigma: float | None = None,
) -> EvalResult:
    """One evaluation of one committed checkpoint, as configured by ``cfg.eval``.

    ``sample_fn_builder`` replaces the default (the checkpoint's EMA network with the configured
    sampler), e.g. to evaluate another generator against the same reference. ``posthoc_sigma``: the
    weights are the post-hoc EMA of that relative length instead, at ``checkpoint`` images seen
    ('latest': the last snapshot), written under ``eval/<images seen>/<name with phema<sigma>>``.
    """
    ev = cfg.eval
    ckpt, ema_rate, posthoc, name = _target(ev, run_url, checkpoint, posthoc_sigma)
    settings = sampler_settings(ev)
    guidance, classifier = guidance_provenance(cfg)
    model = cfg.model.model_dump(mode="json")
    diffusion = cfg.diffusion.model_dump(mode="json")
    device = "cuda" if ev.gpus_per_worker > 0 else "cpu"
    timings: dict[str, float] = {}

    # Resolve the feature extractors first: a missing weights file fails before an hour of sampling.
    sources = resolve_sources(ev)
    source = sources[0]
    builder = sample_fn_builder or CheckpointSampleFn(run_url, ckpt.images_seen, ema_rate, model, diffusion,
                                                      settings, device, classifier,
                                                      posthoc_sigma=None if posthoc is None else posthoc["sigma_rel"])
    resolution = resolve_model_resolution(cfg) if sample_fn_builder is None else None
    unclip, prompts, embedder = None, None, None
    if ev.prior_run:  # unCLIP: prompts -> prior -> decoder; checked before any sampling
        if sample_fn_builder is not None or posthoc is not None:
            raise ValueError("eval.prior_run: only with a checkpoint's EMA of the decoder run (not with post-hoc EMA "
                             "or a custom sample function)")
        builder, unclip, prompts, embedder = _unclip(cfg, run_url, ckpt.images_seen, ema_rate, device)
    upsampler = None
    if ev.upsampler_run:  # ADM-U cascade: checked (and its weights resolved) before any sampling
        builder, upsampler = _cascade(cfg, builder, device)
        resolution = upsampler["resolution"]
    spec = {"checkpoint": ckpt.rel, "images_seen": ckpt.images_seen, "ema_rate": ema_rate,
            **({"posthoc_ema": {k: posthoc[k] for k in ("sigma_rel", "at_images", "snapshot_images")}}
               if posthoc else {}),
            "sampler": settings.as_dict(), "model": model, "diffusion": diffusion,
            **({"classifier": guidance["classifier"]} if classifier else {}),
            **({"cascade": upsampler} if upsampler else {}),
            **({"unclip": unclip} if unclip else {}),
            "custom_sample_fn": None if sample_fn_builder is None else _describe(sample_fn_builder)}
    out_url = evaluation_url(run_url, ckpt, name)
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

    reference_url = ev.reference_url or cfg.data.url
    scores = score_samples(ev, out_url, sources, reference_url, resolution, progress, ray_address)
    metrics: dict[str, Any] = {**probe, **scores.metrics}
    skipped, reference, intervals = scores.skipped, scores.reference, dict(scores.intervals)
    timings.update(scores.timings)
    if "clip_score" in ev.metrics:
        from evaluation.sampling import read_samples
        from evaluation.unclip import prompts_of, score_clip

        start = time.perf_counter()
        images = np.concatenate(list(read_samples(out_url, ev.num_samples, ev.samples_per_shard)))
        clip = score_clip(images, prompts_of(prompts, range(ev.num_samples)), embedder,
                          resamples=ev.bootstrap_resamples, level=ev.bootstrap_level, seed=ev.bootstrap_seed)
        metrics["clip_score"] = clip["clip_score"]["value"]
        if clip["clip_score"]["interval"] is not None:
            intervals["clip_score"] = clip["clip_score"]["interval"]
        timings["clip_score_s"] = time.perf_counter() - start
    if "bpd" in ev.metrics and posthoc is not None:
        skipped["bpd"] = "bits/dim reads a checkpoint's EMA; not computed for post-hoc EMA weights"
    elif "bpd" in ev.metrics and upsampler is not None:
        skipped["bpd"] = "bits/dim is the first stage's likelihood, not the cascade's; evaluate without an upsampler"
    elif "bpd" in ev.metrics:
        start = time.perf_counter()
        metrics.update(_bits_per_dim(cfg, CheckpointModel(run_url, ckpt.images_seen, ema_rate, model, diffusion),
                                     progress, ray_address))
        timings["bpd_s"] = time.perf_counter() - start
    record = {
        **_what_was_sampled(cfg, run_url, ckpt, ema_rate, posthoc, name, settings, guidance, sample_fn_builder),
        "cascade": upsampler,  # the second stage (ADM-U), None for the model alone
        "unclip": unclip,  # prior, CLIP embedder and prompts of a unCLIP decoder, None otherwise
        "resolution": resolution,
        "samples": {"url": out_url, "samples_per_shard": ev.samples_per_shard, "batch_size": ev.batch_size,
                    "num_workers": ev.num_workers, "shards_generated": len(generation.generated),
                    "shards_reused": len(generation.skipped), "npz": npz_url,
                    "images_per_second": generation.images_per_second},
        "reference": reference.provenance(ev.reference_url or cfg.data.url) if reference else None,
        "feature_extractor": source.provenance() if source else None,
        "dinov2": _dinov2_provenance(sources[1], scores.dinov2_reference, ev.reference_url or cfg.data.url),
        "metric_settings": {"metrics": list(ev.metrics), "pr_k": ev.pr_k, "kid_subsets": ev.kid_subsets,
                            "kid_subset_size": ev.kid_subset_size, "is_splits": ev.is_splits,
                            "inception_layers": list(feature_layers(source)) if source else [],
                            "bootstrap": {"resamples": ev.bootstrap_resamples, "seed": ev.bootstrap_seed,
                                          "level": ev.bootstrap_level, "kid_subsets": ev.bootstrap_kid_subsets}},
        "metrics": metrics,
        "intervals": intervals,
        "skipped": skipped,
        "timings": timings,
        "versions": library_versions(),
        "created_utc": utc_now(),
    }
    _record(run_url, out_url, record)
    return EvalResult(out_url, record)


def unclip_parts(cfg: ExperimentConfig) -> tuple[Any, Any, list[str], dict[str, Any]]:
    """(prior, CLIP embedder, prompts, prompts' provenance) of ``eval.prior_run``; ValueError (or
    FileNotFoundError for the CLIP weights) when one is missing or they do not fit together."""
    from evaluation.unclip import check_chain, evaluation_prompts
    from pipeline.data.clip_embed import load_embedder
    from pipeline.loading import load_model

    ev = cfg.eval
    if ev.classifier_scale:
        raise ValueError("eval.prior_run: classifier guidance is not allowed with unCLIP; use --guidance-scale")
    if not (ev.clip_model and ev.clip_weights):
        raise ValueError("eval.prior_run needs eval.clip_model and eval.clip_weights (--clip-model, --clip-weights): "
                         "the CLIP model that embedded the decoder's training data")
    prior = load_model(ev.prior_run, checkpoint=ev.prior_checkpoint)
    embedder = load_embedder(ev.clip_model, ev.clip_weights)
    check_chain(prior, None, int(embedder.dim))
    prompts, record = evaluation_prompts(ev.prompts_url or ev.reference_url or cfg.data.url, ev.prompts_max)
    return prior, embedder, prompts, record


def _unclip(cfg: ExperimentConfig, run_url: str, images_seen: int, ema_rate: float | None, device: str):
    """The unCLIP chain's sample-function builder, its provenance, the prompts and the CLIP embedder."""
    from evaluation.unclip import UnclipSampleFn, check_chain
    from pipeline.loading import load_model

    ev = cfg.eval
    prior, embedder, prompts, prompt_record = unclip_parts(cfg)
    check_chain(prior, load_model(run_url, checkpoint=images_seen, ema_rate=ema_rate), int(embedder.dim))
    src = dict(prior.source)
    ref = {"source": ev.prior_run, "checkpoint": src["images_seen"] if src["kind"] == "checkpoint" else "latest",
           "ema_rate": src.get("ema_rate")}
    builder = UnclipSampleFn(run_url, images_seen, ema_rate, ref, ev.clip_model, ev.clip_weights, tuple(prompts),
                             ev.prior_steps, ev.prior_guidance_scale, ev.steps, ev.guidance_scale, ev.sampler, ev.eta,
                             device)
    record = {"prior": {"source": src, "objective": prior.diffusion.objective, "steps": ev.prior_steps,
                        "guidance_scale": ev.prior_guidance_scale,
                        "candidates": int(prior.diffusion.objective_options().candidates)},
              "decoder_guidance_scale": ev.guidance_scale, "clip": embedder.identity(), "prompts": prompt_record}
    return builder, record, prompts, embedder


def upsampler_parts(cfg: ExperimentConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the reference the workers load, the provenance) of ``eval.upsampler_run``, checked against the
    first stage of ``cfg``; ValueError when it does not fit."""
    from evaluation.cascade import resolve_upsampler

    ev = cfg.eval
    return resolve_upsampler(ev.upsampler_run, ev.upsampler_checkpoint, ev.upsampler_ema_rate,
                             resolve_model_resolution(cfg), resolve_model_classes(cfg), sampler=ev.upsampler_sampler,
                             steps=ev.upsampler_steps, noise_level=ev.upsampler_noise_level)


def _cascade(cfg: ExperimentConfig, base: Callable, device: str) -> tuple[Callable, dict[str, Any]]:
    """The first stage's builder wrapped by the configured upsampler, and the upsampler's provenance."""
    from evaluation.cascade import CascadeSampleFn

    ev = cfg.eval
    ref, record = upsampler_parts(cfg)
    builder = CascadeSampleFn(base, ref, ev.upsampler_sampler, ev.upsampler_steps, ev.upsampler_noise_level,
                              ev.batch_size, device)
    return builder, record


def _what_was_sampled(cfg: ExperimentConfig, run_url: str, ckpt: Checkpoint, ema_rate: float | None,
                      posthoc: dict[str, Any] | None, name: str, settings: SamplerSettings, guidance: dict[str, Any],
                      custom: Callable | None) -> dict[str, Any]:
    """The first fields of metrics.json: which weights, which sampler and guidance, which seeds."""
    ev = cfg.eval
    return {
        "run": run_url,
        "checkpoint": {"name": ckpt.name, "path": ckpt.rel, "images_seen": ckpt.images_seen,
                       "step": ckpt.step, "config_hash": ckpt.config_hash},
        "ema_rate": ema_rate,
        **({"posthoc_ema": posthoc} if posthoc is not None else {}),
        "name": name,
        "sampler": settings.as_dict() if custom is None else {"custom": _describe(custom)},
        # fewer than sampler.steps where Karras levels snapped to a discrete schedule coincide
        "steps_used": None if custom is not None else steps_used(cfg.diffusion.objective,
                                                                 cfg.diffusion.objective_options(),
                                                                 settings.sampler, settings.steps),
        "guidance": guidance if custom is None else None,
        "objective": cfg.diffusion.objective,
        "num_samples": ev.num_samples,
        "seeds": {"eval_seed": ev.seed, "rule": SEED_RULE,
                  "first_seeds": [int(s) for s in sample_seeds(ev.seed, range(min(3, ev.num_samples)))]},
    }


def _target(ev: EvalConfig, run_url: str, checkpoint: str | int, posthoc_sigma: float | None):
    """(checkpoint, EMA rate or None, post-hoc EMA provenance or None, evaluation folder name)."""
    if posthoc_sigma is None:
        ckpt = resolve_checkpoint(run_url, checkpoint)
        ema_rate = _ema_rate(ev, ckpt)
        return ckpt, ema_rate, None, ev.name or default_name(ev, ema_rate)
    ckpt, posthoc = _posthoc_checkpoint(run_url, posthoc_sigma, checkpoint)
    # one folder per length of a sweep
    name = f"{ev.name}-phema{posthoc_sigma:g}" if ev.name else default_name(ev, None, posthoc_sigma)
    return ckpt, None, posthoc, name


def _bits_per_dim(cfg: ExperimentConfig, model: CheckpointModel, progress: bool, ray_address: str | None):
    """Bits/dim of the full-chain VLB over held-out shards, on the actor pool."""
    ev = cfg.eval
    return bits_per_dim(model, ev.bpd_url or cfg.data.url, max_images=ev.bpd_max_images, eval_seed=ev.seed,
                        batch_size=ev.batch_size, num_workers=ev.num_workers, cpus_per_worker=ev.cpus_per_worker,
                        gpus_per_worker=ev.gpus_per_worker, timeout_s=ev.worker_timeout_s, progress=progress,
                        ray_address=ray_address)


def _posthoc_checkpoint(run_url: str, sigma_rel: float, at: str | int) -> tuple[Checkpoint, dict[str, Any]]:
    """The time of a post-hoc EMA as a checkpoint record (``posthoc_ema/<images seen>``) and its provenance."""
    from pipeline.posthoc import posthoc_plan

    plan = posthoc_plan(run_url, sigma_rel, at)
    last = plan.snapshots[-1].manifest
    manifest = {"step": None, "config_hash": last.get("config_hash")}
    return Checkpoint(plan.at_images, f"posthoc_ema/{plan.at_images:012d}", manifest), plan.provenance()


def evaluate_posthoc_sweep(
    cfg: ExperimentConfig,
    run_url: str,
    sigma_rels: list[float],
    at: str | int = "latest",
    *,
    progress: bool = True,
    ray_address: str | None = None,
) -> tuple[list[EvalResult], str]:
    """Evaluate the post-hoc EMA of each relative length at one time (one metrics.json each), then
    plot the metrics against sigma_rel. Returns the results and the plot's URL
    (``<run>/eval/<images seen>/posthoc_sweep.png``, beside ``posthoc_sweep.json``)."""
    from pipeline.diffusion.phema import check_sigma_rel

    if not sigma_rels:
        raise ValueError("posthoc sigma_rel: give at least one value")
    sigmas = [check_sigma_rel(s, "posthoc sigma_rel") for s in sigma_rels]
    results = [evaluate_checkpoint(cfg, run_url, at, progress=progress, ray_address=ray_address, posthoc_sigma=s)
               for s in sigmas]
    folder = storage.join(run_url, "eval", f"{results[0].record['checkpoint']['images_seen']:012d}")
    rows = [{"sigma_rel": r.record["posthoc_ema"]["sigma_rel"], "name": r.record["name"], "url": r.url,
             **{k: v for k, v in r.metrics.items() if isinstance(v, (int, float))}} for r in results]
    storage.write_bytes(storage.join(folder, "posthoc_sweep.json"), json.dumps(rows, indent=1).encode())
    url = storage.join(folder, "posthoc_sweep.png")
    plot_posthoc_sweep(rows, url)
    return results, url


def plot_posthoc_sweep(rows: list[dict[str, Any]], url: str) -> None:
    """One panel per metric (FID first), x = sigma_rel of the post-hoc EMA."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(rows, key=lambda r: r["sigma_rel"])
    present = [m for m in ("fid", "kid", "is", "precision", "recall") if any(m in r for r in rows)]
    present = present or [k for k in rows[0] if k not in ("sigma_rel", "name", "url")][:1]
    fig, axes = plt.subplots(1, max(len(present), 1), figsize=(4 * max(len(present), 1), 3.2), squeeze=False)
    for ax, metric in zip(axes[0], present):
        points = [(r["sigma_rel"], r[metric]) for r in rows if metric in r]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o")
        ax.set_title(f"{metric} vs post-hoc EMA length")
        ax.set_xlabel("sigma_rel")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    storage.write_bytes(url, buffer.getvalue())


def _record(run_url: str, out_url: str, record: dict[str, Any]) -> None:
    metrics = record["metrics"]
    images_seen = record["checkpoint"]["images_seen"]
    row = {"checkpoint": record["checkpoint"]["name"], "images_seen": images_seen, "name": record["name"],
           "num_samples": record["num_samples"], "created_utc": record["created_utc"],
           "feature_extractor": (record["feature_extractor"] or {}).get("feature_extractor"), **metrics,
           **interval_columns(record.get("intervals") or {})}
    rows = append_table(storage.join(run_url, "eval", "metrics.tsv"), row)
    plot_metrics(rows, storage.join(run_url, "eval", "metrics.png"))
    scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not k.endswith("_count")}
    write_tensorboard(storage.join(run_url, "logs", "eval"), record["name"], images_seen, scalars)
    write_metrics_json(storage.join(out_url, METRICS_FILE), record)  # last: marks the evaluation done


def _dinov2_provenance(source, reference, reference_url: str) -> dict[str, Any] | None:
    if source is None:
        return None
    from evaluation.dinov2 import is_vit_l14

    return {**source.provenance(), "vit_l14": is_vit_l14(source.weights_path),
            "reference": reference.provenance(reference_url) if reference else None}


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

