"""Inception features of image shards (a dataset's or generated), distributed over the shards.

A dataset's reference features and statistics are computed once and cached under
``<cache>/<sha256 of dataset.json>/<extractor>-<weights sha256[:12]>[-n<max>][-r<size>].npz``: a
new manifest (new data), other weights or another image size give a new entry; the same ones are
never recomputed. Every shard read is checked against the sha256 its manifest records.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import os
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from evaluation.features import extract_features, feature_layers, get_extractor, main_layer
from evaluation.inception import ExtractorSource
from evaluation.metrics import SPATIAL, FeatureStatistics, feature_statistics
from evaluation.pool import run_on_pool
from pipeline.data import storage
from pipeline.data.images import center_crop_resize
from pipeline.data.shards import Manifest, ShardIntegrityError, manifest_url_for, read_manifest

__all__ = [
    "ReferenceFeatures",
    "ShardItem",
    "dataset_manifest",
    "decode_image_tar",
    "decode_labelled_tar",
    "default_cache_url",
    "features_of_shards",
    "leading_shards",
    "read_shard_images",
    "reference_features",
]

IMAGE_SUFFIXES = ("png", "jpg", "jpeg", "webp", "bmp")


def default_cache_url() -> str:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(root) / "diffusion-pipeline" / "reference-stats")


def dataset_manifest(dataset_url: str) -> tuple[Manifest, str, list[ShardItem]]:
    """``(manifest, sha256 of dataset.json, shard items)`` of a prepared dataset."""
    url = manifest_url_for(dataset_url)
    manifest = read_manifest(dataset_url)
    digest = hashlib.sha256(storage.read_bytes(url)).hexdigest()
    items = [ShardItem(manifest.shard_url(i), s.samples, s.sha256) for i, s in enumerate(manifest.shards)]
    return manifest, digest, items


@dataclass(frozen=True)
class ShardItem:
    """One tar of images to read: at most ``limit`` images, checked against ``sha256``, and
    centre-cropped/resized to ``resolution`` when given."""

    url: str
    limit: int | None = None
    sha256: str | None = None
    resolution: int | None = None


def read_shard_images(item: ShardItem) -> tuple[np.ndarray, np.ndarray | None]:
    data = storage.read_bytes(item.url)
    if item.sha256 is not None and hashlib.sha256(data).hexdigest() != item.sha256:
        raise ShardIntegrityError(f"{item.url}: sha256 differs from the dataset manifest's {item.sha256[:12]}...")
    images, labels = decode_labelled_tar(data, item.limit)
    if item.resolution and len(images) and images.shape[1:3] != (item.resolution, item.resolution):
        images = np.stack([center_crop_resize(im, item.resolution) for im in images])
    return images, labels


def decode_image_tar(data: bytes, limit: int | None = None) -> np.ndarray:
    """uint8 (N, H, W, 3) images of a WebDataset tar (members ``key.png|jpg|...``), in key order."""
    return decode_labelled_tar(data, limit)[0]


def decode_labelled_tar(data: bytes, limit: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Images and, when every sample has a ``key.cls`` member, their int labels (else None)."""
    images: dict[str, np.ndarray] = {}
    labels: dict[str, int] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
        for member in tar.getmembers():
            if not member.isfile():
                continue
            key, _, suffix = member.name.rpartition(".")
            suffix = suffix.lower()
            if suffix in IMAGE_SUFFIXES and (limit is None or len(images) < limit):
                with Image.open(io.BytesIO(tar.extractfile(member).read())) as image:
                    images[key] = np.asarray(image.convert("RGB"))
            elif suffix == "cls":
                labels[key] = int(tar.extractfile(member).read().decode().strip())
    keys = sorted(images)
    if not keys:
        return np.zeros((0, 1, 1, 3), np.uint8), None
    label_array = np.array([labels[k] for k in keys], np.int64) if all(k in labels for k in keys) else None
    return np.stack([images[k] for k in keys]), label_array


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"  # a worker sees a GPU only when given one


def _shard_features(source: ExtractorSource, item: ShardItem, batch_size: int) -> dict[str, np.ndarray]:
    images, _ = read_shard_images(item)
    if len(images) == 0:
        return {}
    return extract_features(source, [images], batch_size=batch_size, device=_device())


def _extractor_setup(source: ExtractorSource) -> ExtractorSource:
    get_extractor(source, _device())  # load the weights once per worker
    return source


def features_of_shards(
    source: ExtractorSource,
    items: Sequence[ShardItem],
    num_workers: int = 1,
    cpus_per_worker: float = 1.0,
    gpus_per_worker: float = 0.0,
    batch_size: int = 64,
    timeout_s: float = 3600.0,
    progress: str | None = None,
    ray_address: str | None = None,
) -> dict[str, np.ndarray]:
    """Features of the images of ``items``, concatenated in item order (whatever the worker count)."""
    items = list(items)
    order = {item: i for i, item in enumerate(items)}
    results: dict[int, dict[str, np.ndarray]] = {}
    for item, feats in run_on_pool(
        functools.partial(_extractor_setup, source), functools.partial(_shard_features, batch_size=batch_size),
        items, num_workers=num_workers, cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker,
        timeout_s=timeout_s, progress=progress,
        units=lambda it: it.limit or 1, ray_address=ray_address,
    ):
        results[order[item]] = feats
    parts = [results[i] for i in range(len(items)) if results[i]]
    if not parts:
        raise ValueError(f"no images in shards {[it.url for it in items[:3]]}...")
    return {layer: np.concatenate([p[layer] for p in parts]) for layer in parts[0]}


def leading_shards(items: Sequence[ShardItem], max_images: int | None) -> list[ShardItem]:
    """The leading shards that hold ``max_images`` images, the last one capped."""
    if not max_images:
        return list(items)
    out, total = [], 0
    for item in items:
        if total >= max_images:
            break
        count = item.limit if item.limit is not None else max_images
        out.append(dataclasses.replace(item, limit=min(count, max_images - total)))
        total += count
    return out


@dataclass(frozen=True)
class ReferenceFeatures:
    features: dict[str, np.ndarray]  # {main layer: (N, D)}: "2048" for Inception, "dinov2" for DINOv2
    stats: FeatureStatistics  # of the main layer
    manifest_sha256: str
    cache_url: str
    from_cache: bool
    resolution: int | None
    layer_stats: dict[str, FeatureStatistics] = dataclasses.field(default_factory=dict)  # every layer's

    def provenance(self, dataset_url: str) -> dict:
        return {"dataset_url": dataset_url, "manifest_sha256": self.manifest_sha256, "count": self.stats.count,
                "resolution": self.resolution, "cache_url": self.cache_url, "from_cache": self.from_cache}


def _read_cache(data, source: ExtractorSource) -> tuple[dict, dict] | None:
    """(features, per-layer statistics) of a cache file, or None when it lacks a layer (older format)."""
    main = main_layer(source)
    stats = {main: FeatureStatistics.from_arrays(data)}
    if SPATIAL in feature_layers(source):
        if "spatial_mu" not in data.files:
            return None  # written before sFID: recompute
        stats[SPATIAL] = FeatureStatistics.from_arrays(
            {"mu": data["spatial_mu"], "sigma": data["spatial_sigma"], "count": data["count"]})
    return {main: data["features"]}, stats


def reference_features(
    dataset_url: str,
    source: ExtractorSource,
    cache_url: str | None = None,
    max_images: int | None = None,
    resolution: int | None = None,
    num_workers: int = 1,
    cpus_per_worker: float = 1.0,
    gpus_per_worker: float = 0.0,
    batch_size: int = 64,
    timeout_s: float = 3600.0,
    progress: bool = True,
    ray_address: str | None = None,
) -> ReferenceFeatures:
    """Features and statistics of a dataset's images, computed once per (manifest, weights, size).

    Keeps the main layer's features (pool3 for Inception: FID, precision/recall, KID; the CLS token
    for DINOv2) and every layer's mean and covariance (for Inception also mixed_6/conv: sFID).
    ``resolution`` centre-crops/resizes the images first (the size the model generates at), as
    the training reader does; None keeps them as stored.
    """
    _, manifest_sha, shards = dataset_manifest(dataset_url)
    variant = (f"-n{max_images}" if max_images else "") + (f"-r{resolution}" if resolution else "")
    cache = storage.join(cache_url or default_cache_url(), manifest_sha[:16],
                         f"{source.name}-{source.sha256[:12]}{variant}.npz")
    main = main_layer(source)
    if storage.exists(cache):
        with np.load(io.BytesIO(storage.read_bytes(cache))) as data:
            cached = _read_cache(data, source)
        if cached is not None:
            feats, stats = cached
            return ReferenceFeatures(feats, stats[main], manifest_sha, cache, True, resolution, stats)
    items = [dataclasses.replace(it, resolution=resolution) for it in leading_shards(shards, max_images)]
    feats = features_of_shards(source, items, num_workers=num_workers, cpus_per_worker=cpus_per_worker,
                               gpus_per_worker=gpus_per_worker, batch_size=batch_size, timeout_s=timeout_s,
                               progress="reference features" if progress else None, ray_address=ray_address)
    feats = {layer: (v[:max_images] if max_images else v) for layer, v in feats.items()}
    stats = {main: feature_statistics(feats[main])}
    extra = {}
    if SPATIAL in feats:
        stats[SPATIAL] = feature_statistics(feats[SPATIAL])
        extra = {"spatial_mu": stats[SPATIAL].mu, "spatial_sigma": stats[SPATIAL].sigma}
    buffer = io.BytesIO()
    np.savez(buffer, features=feats[main], **stats[main].to_arrays(), **extra)
    storage.write_bytes(cache, buffer.getvalue())
    return ReferenceFeatures({main: feats[main]}, stats[main], manifest_sha, cache, False, resolution, stats)
