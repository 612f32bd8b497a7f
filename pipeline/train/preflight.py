"""Checks that run in the driver before Ray starts: everything the config and the data manifest
can tell us is wrong, found in seconds instead of inside the Ray workers half a minute later.

Each check raises :class:`PreflightError` whose message names the key, the value and what is
allowed; ``launch/train.py`` prints it and exits with status 2. Network checks (S3 reachability
and credentials) use one short attempt each (``PREFLIGHT_CONNECT_TIMEOUT_S``), never the
training run's long retry policy.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import ExperimentConfig

__all__ = ["PREFLIGHT_CONNECT_TIMEOUT_S", "PreflightError", "check_config_file", "preflight"]

PREFLIGHT_CONNECT_TIMEOUT_S = 5.0
PREFLIGHT_READ_TIMEOUT_S = 10.0


class PreflightError(ValueError):
    """A launch problem found before Ray starts; the message names key, value and what is allowed."""


def check_config_file(path: str | Path | None) -> None:
    """An empty config file (or one holding only comments) would silently train the defaults."""
    if path is None:
        return
    path = Path(path)
    if not path.is_file():
        return  # load_config reports a missing file
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        return  # load_config reports invalid YAML
    if loaded is None:
        raise PreflightError(f"--config: '{path}' is empty; it must hold a mapping of sections (model, diffusion, "
                             "data, train, ...), e.g. configs/quickstart.yaml. Omit --config to train the defaults")
    if not isinstance(loaded, dict):
        raise PreflightError(f"--config: '{path}' holds a {type(loaded).__name__} at the top level; it must hold a "
                             "mapping of sections (model, diffusion, data, train, ...)")


def preflight(cfg: ExperimentConfig) -> None:
    """Every check that needs no Ray, in order of cost (cheap first)."""
    check_url("data.url", cfg.data.url)
    check_url("train.run_dir", cfg.train.run_dir)
    net_config = check_model(cfg)
    check_objective_inputs(cfg)
    check_resolution(cfg, net_config)
    settings = _short_settings(cfg)
    manifest = check_data(cfg, settings)
    check_shards(cfg, manifest)
    check_fields(cfg, manifest, net_config)
    check_run_dir_storage(cfg)
    check_resume(cfg, manifest)


# ---------------------------------------------------------------------------------------------
# Config-only checks


def check_url(key: str, url: str) -> None:
    if not url:
        raise PreflightError(f"{key}: '' is not allowed; give a local path or an s3://bucket/prefix URL")
    if "://" in url and not url.startswith("s3://"):
        scheme = url.split("://", 1)[0]
        raise PreflightError(f"{key}: {url!r} is not allowed: scheme '{scheme}://' is not supported; "
                             "use a local path or s3://bucket/prefix")
    if url.startswith("s3://") and not url[len("s3://"):].split("/", 1)[0]:
        raise PreflightError(f"{key}: {url!r} has no bucket; use s3://bucket/prefix")


def check_model(cfg: ExperimentConfig) -> Any:
    """The network's config (preset plus overrides), without building the network."""
    from pipeline.models import PRESETS, resolve_preset

    if cfg.model.preset not in PRESETS:
        raise PreflightError(f"model.preset: {cfg.model.preset!r} is not allowed; allowed: {', '.join(sorted(PRESETS))}")
    try:
        return resolve_preset(cfg.model.preset, **dict(cfg.model.overrides))
    except (TypeError, ValueError) as exc:
        raise PreflightError(f"model.overrides: {dict(cfg.model.overrides)!r} is not allowed: {exc}") from None


def check_objective_inputs(cfg: ExperimentConfig) -> None:
    """The per-sample extras the objective trains on are among ``data.fields``; an objective that generates
    embeddings (the unCLIP prior) has no training-time image grid."""
    from pipeline.diffusion.registry import OBJECTIVES

    name, spec = cfg.diffusion.objective, OBJECTIVES[cfg.diffusion.objective]
    missing = [f for f in spec.cond_fields if f not in cfg.data.fields]
    if missing:
        raise PreflightError(f"data.fields: {list(cfg.data.fields)} is not allowed for objective {name!r}: it trains on "
                             f"{list(spec.cond_fields)} (missing {missing}); set data.fields=[{', '.join(spec.cond_fields)}] "
                             "and prepare the data with launch/prepare_data.py --embed clip")
    if not spec.images and cfg.train.sample_every_images:
        raise PreflightError(f"train.sample_every_images: {cfg.train.sample_every_images} is not allowed for objective "
                             f"{name!r}: it generates embeddings, not images; set it to 0")


def check_resolution(cfg: ExperimentConfig, net_config: Any) -> None:
    size = getattr(net_config, "image_size", None)
    if size is not None and cfg.data.resolution != size:
        raise PreflightError(
            f"data.resolution: {cfg.data.resolution} is not allowed with model {cfg.model.preset!r} of "
            f"image_size {size}; the reader must yield the size the network was built for: set "
            f"data.resolution={size} or model.overrides.image_size={cfg.data.resolution}")


def check_shards(cfg: ExperimentConfig, manifest: Any) -> None:
    readers = cfg.train.num_workers * max(1, cfg.data.loader_workers)
    if len(manifest.shards) < readers:
        raise PreflightError(
            f"train.num_workers: {cfg.train.num_workers} is not allowed with dataset {cfg.data.url!r}: its "
            f"{len(manifest.shards)} shard(s) cannot feed {cfg.train.num_workers} workers x "
            f"{max(1, cfg.data.loader_workers)} loader workers; allowed: num_workers x max(1, data.loader_workers) "
            f"<= {len(manifest.shards)} (or re-shard with a smaller --shard-size)")
    if cfg.data.require_labels and not manifest.labelled:
        raise PreflightError(f"data.require_labels: True is not allowed: dataset {cfg.data.url!r} has no classes; "
                             "set data.require_labels=false or prepare a labelled dataset")


def check_fields(cfg: ExperimentConfig, manifest: Any, net_config: Any) -> None:
    """``data.fields`` (per-sample CLIP embeddings) must be in the shards, and their size must be the
    network's embedding size (``embed_dim`` of a prior, ``cond_embed_dim`` of a conditioned U-Net)."""
    from pipeline.data.reader import MissingFieldError, check_fields as reader_check_fields

    if not cfg.data.fields:
        return
    try:
        dim = reader_check_fields(manifest, tuple(cfg.data.fields))
    except MissingFieldError as exc:
        raise PreflightError(str(exc)) from None
    for key in ("embed_dim", "cond_embed_dim"):
        want = int(getattr(net_config, key, 0) or 0)
        if want and want != dim:
            emb = manifest.embedder
            raise PreflightError(
                f"model.overrides.{key}: {want} is not allowed with dataset {cfg.data.url!r}: its {emb['model']} "
                f"embeddings ({', '.join(cfg.data.fields)}) have dimension {dim}; set model.overrides.{key}={dim} "
                "or prepare the data with a CLIP model of that dimension")
        if want:
            break
    check_objective_takes_cond(cfg)


def check_objective_takes_cond(cfg: ExperimentConfig) -> None:
    """With ``data.fields`` the loop passes them as ``training_loss(..., cond=)``: the objective must take
    it, i.e. declare ``cond_fields`` in the registry."""
    from pipeline.diffusion.registry import OBJECTIVES

    if not OBJECTIVES[cfg.diffusion.objective].cond_fields:
        raise PreflightError(
            f"data.fields: {list(cfg.data.fields)!r} is not allowed with diffusion.objective="
            f"{cfg.diffusion.objective!r}: it takes no per-sample conditioning (no cond= in its training_loss); "
            "set data.fields=[] or choose an objective that is conditioned on embeddings")


# ---------------------------------------------------------------------------------------------
# Storage checks (short timeouts, one attempt)


def _short_settings(cfg: ExperimentConfig):
    from pipeline.data import storage

    return dataclasses.replace(storage.settings_from_config(cfg.data), max_attempts=1,
                               connect_timeout_s=min(cfg.data.s3_connect_timeout_s, PREFLIGHT_CONNECT_TIMEOUT_S),
                               read_timeout_s=min(cfg.data.s3_read_timeout_s, PREFLIGHT_READ_TIMEOUT_S))


def _storage_message(key: str, url: str, exc: BaseException) -> str:
    from pipeline.data import storage

    if isinstance(exc, storage.EndpointUnreachable):
        allowed = ("a reachable endpoint: check data.s3_endpoint_url / AWS_ENDPOINT_URL and that the store is up")
    elif isinstance(exc, storage.AccessDenied):
        allowed = "credentials the store accepts (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or a profile)"
    elif isinstance(exc, storage.BucketNotFound):
        allowed = "an existing bucket"
    else:
        allowed = "a readable location"
    return f"{key}: {url!r} is not usable: {exc}; needed: {allowed}"


def check_data(cfg: ExperimentConfig, settings: Any) -> Any:
    """The dataset manifest, read with one short attempt (reachability, credentials, bucket)."""
    from pipeline.data import storage
    from pipeline.data.shards import read_manifest

    url = cfg.data.url
    try:
        if url.startswith("s3://"):
            storage.check_bucket(url, settings)
        return read_manifest(url, settings)
    except FileNotFoundError:
        raise PreflightError(f"data.url: {url!r} holds no dataset.json; allowed: a prepared dataset, e.g. "
                             f"python launch/prepare_data.py --source builtin:shapes10 --out {url}") from None
    except storage.StorageError as exc:
        raise PreflightError(_storage_message("data.url", url, exc)) from None
    except ValueError as exc:
        raise PreflightError(f"data.url: {url!r} is not allowed: {exc}") from None


def check_run_dir_storage(cfg: ExperimentConfig) -> None:
    """An ``s3://`` run directory: its bucket must answer with the credentials of this process.
    (The run directory uses the environment's endpoint, as :class:`pipeline.train.rundir.RunDir` does.)"""
    from pipeline.data import storage

    url = cfg.train.run_dir
    if not url.startswith("s3://"):
        return
    settings = storage.S3Settings(max_attempts=1, connect_timeout_s=PREFLIGHT_CONNECT_TIMEOUT_S,
                                  read_timeout_s=PREFLIGHT_READ_TIMEOUT_S)
    try:
        storage.check_bucket(url, settings)
    except storage.StorageError as exc:
        raise PreflightError(_storage_message("train.run_dir", url, exc)) from None


# ---------------------------------------------------------------------------------------------
# Resume


def check_resume(cfg: ExperimentConfig, data_manifest: Any = None) -> None:
    """The checkpoint the run would resume from must fit this config: the same model and objective,
    the same ZeRO stage, and the same dataset, data seed and shuffle buffer (the data position is a
    position in that order). Another worker count is allowed (elastic resume)."""
    from pipeline.data import storage
    from pipeline.train.checkpoint import committed_checkpoints
    from pipeline.train.loop import model_hash

    tc = cfg.train
    if tc.resume == "never":
        return
    try:
        ckpts = committed_checkpoints(tc.run_dir)
    except storage.StorageError as exc:
        raise PreflightError(_storage_message("train.run_dir", tc.run_dir, exc)) from None
    except FileNotFoundError:
        ckpts = []
    if tc.resume != "auto":
        names = [c.images_seen for c in ckpts]
        try:
            wanted = int(tc.resume)
        except (TypeError, ValueError):
            raise PreflightError(f"train.resume: {tc.resume!r} is not allowed; use 'auto', 'never' or the images "
                                 f"seen of a committed checkpoint: {names}") from None
        match = [c for c in ckpts if c.images_seen == wanted]
        if not match:
            raise PreflightError(f"train.resume: {tc.resume!r} is not allowed: run_dir {tc.run_dir!r} has no committed "
                                 f"checkpoint at {wanted} images; committed: {names}")
        ckpts = match
    if not ckpts:
        return
    # "auto" resumes from the newest checkpoint that verifies; a model mismatch is the same for all.
    ckpt = ckpts[-1]
    recorded = ckpt.manifest.get("model_hash")
    if recorded is not None and recorded != model_hash(cfg):
        raise PreflightError(
            f"train.resume: {tc.resume!r} is not allowed: checkpoint {tc.run_dir}/{ckpt.rel} was trained with a "
            f"different model or diffusion configuration than model.preset={cfg.model.preset!r} with these "
            "overrides/diffusion settings; allowed: the run's original model and diffusion sections, a new "
            "train.run_dir, or train.resume=never")
    stage = ckpt.manifest.get("zero_stage")
    if stage is not None and stage != tc.zero_stage:
        raise PreflightError(
            f"train.zero_stage: {tc.zero_stage} is not allowed: checkpoint {tc.run_dir}/{ckpt.rel} was written with "
            f"ZeRO stage {stage}; allowed: train.zero_stage={stage}, a new train.run_dir, or train.resume=never")
    ranks = ckpt.manifest.get("ranks") or []
    data = (ranks[0].get("state") or {}).get("data") if ranks else None
    if isinstance(data, dict):
        now = {"data.seed": cfg.data.seed, "data.shuffle_buffer": cfg.data.shuffle_buffer}
        was = {"data.seed": data.get("seed"), "data.shuffle_buffer": data.get("shuffle_buffer")}
        if data_manifest is not None:
            now["data.url"] = data_manifest.fingerprint or data_manifest.url
            was["data.url"] = data.get("dataset")
        for key, value in now.items():
            if was[key] is not None and was[key] != value:
                shown = cfg.data.url if key == "data.url" else value
                raise PreflightError(
                    f"{key}: {shown!r} is not allowed: checkpoint {tc.run_dir}/{ckpt.rel} read "
                    f"{'another dataset' if key == 'data.url' else repr(was[key])}, and its data position is a "
                    f"position in that order; allowed: the checkpoint's {key}, a new train.run_dir, or "
                    "train.resume=never")
