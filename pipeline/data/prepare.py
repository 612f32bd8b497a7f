"""Convert a source into WebDataset shards + manifest, in parallel Ray tasks.

Shard ``i`` holds source samples ``i*S .. (i+1)*S-1``. Each Ray task reads its range, encodes,
writes the tar (multipart upload on S3) and then a small commit record next to it. The manifest
is written last, only when every shard is committed, so:

- an interrupted run leaves no manifest, and re-running writes only the shards with no commit
  record of the same job (same source, sizes, format: the job fingerprint);
- re-running a finished job does nothing (idempotent);
- a destination that holds a *different* finished dataset is refused unless ``overwrite``.

With ``embed`` (an :class:`EmbedSpec`: a CLIP model name and a local weights file), every task
also computes the L2-normalised CLIP image embedding of each sample (and the text embedding of its
caption, when the source has captions) and stores them as ``<key>.clip_img.npy`` /
``<key>.clip_txt.npy``; ``dataset.json`` records the embedder (name, model, weights sha256, dim).
The weights are loaded once in the driver first, so a missing file or a bad model name fails
before any shard is written.

Ray starts in-process (bound to 127.0.0.1, no dashboard) unless ``RAY_ADDRESS``/``ray_address``
names a cluster; ``workers=0`` runs the same task function in this process without Ray.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from typing import Any

from tqdm.auto import tqdm

from pipeline.data import storage
from pipeline.data.images import IMAGE_FORMATS
from pipeline.data.shards import (
    MANIFEST_VERSION,
    Manifest,
    ShardInfo,
    manifest_url_for,
    parse_manifest,
    shard_done_url,
    write_manifest,
    write_shard,
)
from pipeline.data.sources import Record, Source, open_source

__all__ = ["EmbedSpec", "PrepareResult", "prepare_dataset", "ensure_ray"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EmbedSpec:
    """CLIP embeddings to compute while preparing: open_clip model name and weights file (never downloaded)."""

    model: str
    weights: str
    sha256: str = ""  # filled in by prepare_dataset from the file it checked; tasks refuse another file


@dataclasses.dataclass(frozen=True)
class PrepareResult:
    manifest: Manifest
    written: int  # shards written by this call
    reused: int  # shards already committed by an earlier (interrupted) run of the same job
    seconds: float


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Attach to ``address``/``RAY_ADDRESS`` or start a local Ray; True when this call started it."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return True
    ray.init(num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=True)
    return True


def _fingerprint(source: Source, shard_size: int, resolution: int | None, image_format: str, quality: int,
                 embedder: dict | None = None) -> str:
    job = {
        "version": MANIFEST_VERSION,
        "source": source.describe(),
        "shard_size": shard_size,
        "resolution": resolution,
        "image_format": image_format,
        "quality": quality if image_format != "png" else None,
        **({"captions": True} if source.captions else {}),
        **({"embedder": embedder} if embedder else {}),
    }
    return hashlib.sha256(json.dumps(job, sort_keys=True).encode()).hexdigest()


def _shard_task(
    source: Source,
    root: str,
    index: int,
    start: int,
    stop: int,
    resolution: int | None,
    image_format: str,
    quality: int,
    fingerprint: str,
    settings: storage.S3Settings | None,
    embed: EmbedSpec | None = None,
) -> ShardInfo:
    records = source.read(start, stop, resolution)
    if embed is not None:
        records = embed_records(records, embed)
    return write_shard(records, root, index, image_format, quality, source.classes, fingerprint, settings)


def embed_records(records: list[Record], embed: EmbedSpec) -> list[Record]:
    """``records`` with their CLIP embeddings attached (``clip_img``; ``clip_txt`` for a captioned record)."""
    import numpy as np

    from pipeline.data.clip_embed import cached_embedder

    embedder = cached_embedder(embed.model, embed.weights)
    if embed.sha256 and embedder.weights_sha256 != embed.sha256:
        raise ValueError(f"clip weights: {embed.weights} changed while preparing (sha256 {embedder.weights_sha256[:12]}, "
                         f"was {embed.sha256[:12]}); re-run with a file that stays put")
    img = [None] * len(records)
    for shape in {r.image.shape for r in records}:  # one forward pass per image size (a folder may mix sizes)
        idx = [i for i, r in enumerate(records) if r.image.shape == shape]
        z = embedder.embed_images(np.stack([records[i].image for i in idx])).numpy()
        for i, row in zip(idx, z):
            img[i] = row
    captioned = [i for i, r in enumerate(records) if r.caption is not None]
    empty = [records[i].origin for i in captioned if not records[i].caption.strip()]
    if empty:
        raise ValueError(f"source: the caption of {empty[0]} is empty; a text embedding needs words (fix its caption)")
    txt = dict(zip(captioned, embedder.embed_texts([records[i].caption for i in captioned]).numpy())) if captioned else {}
    return [
        dataclasses.replace(r, arrays={"clip_img": img[i], **({"clip_txt": txt[i]} if i in txt else {})})
        for i, r in enumerate(records)
    ]


def _committed(root: str, index: int, fingerprint: str, settings: storage.S3Settings | None) -> ShardInfo | None:
    try:
        done = json.loads(storage.read_bytes(shard_done_url(root, index), settings))
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError):
        return None  # a damaged commit record: rewrite the shard
    if done.get("fingerprint") != fingerprint:
        return None
    return ShardInfo(done["name"], int(done["samples"]), done["sha256"], int(done["bytes"]), done.get("resolution"))


def prepare_dataset(
    source: str | Source,
    out: str,
    *,
    shard_size: int = 1000,
    resolution: int | None = None,
    workers: int | None = None,
    image_format: str = "png",
    quality: int = 95,
    num_samples: int | None = None,
    seed: int = 0,
    split: str = "train",
    overwrite: bool = False,
    ray_address: str | None = None,
    settings: storage.S3Settings | None = None,
    progress: bool = True,
    stall_timeout_s: float = 1800.0,
    embed: EmbedSpec | None = None,
) -> PrepareResult:
    """Write ``source`` as shards + ``dataset.json`` under ``out`` (local folder or s3:// prefix);
    with ``embed``, CLIP embeddings per sample (see the module docstring)."""
    t0 = time.monotonic()
    if shard_size < 1:
        raise ValueError(f"shard_size: {shard_size!r} is not allowed; it must be >= 1")
    if resolution is not None and not 4 <= resolution <= 4096:
        raise ValueError(f"resolution: {resolution!r} is not allowed; use 4..4096 or leave it unset")
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format: {image_format!r} is not allowed; use one of {sorted(IMAGE_FORMATS)}")
    if not 1 <= quality <= 100:
        raise ValueError(f"quality: {quality!r} is not allowed; use 1..100")
    if workers is not None and workers < 0:
        raise ValueError(f"workers: {workers!r} is not allowed; use 0 (in this process) or more")
    if not out:
        raise ValueError("out: '' is not allowed; give a local folder or s3://bucket/prefix")
    out = out.rstrip("/")
    if storage.is_s3(out):
        storage.check_bucket(out, settings)  # fail fast: missing bucket, wrong secret, no endpoint
    src = source if isinstance(source, Source) else open_source(
        source, num_samples=num_samples, seed=seed, resolution=resolution, split=split, settings=settings
    )
    if src.num_samples < 1:
        raise ValueError(f"source: {source!r} has no samples")
    embedder = None
    if embed is not None:  # load once here: a missing file or a bad name fails before any shard is written
        from pipeline.data.clip_embed import load_embedder

        weights = embed.weights if storage.is_s3(embed.weights) else os.path.abspath(embed.weights)
        embedder = load_embedder(embed.model, weights).identity()
        embed = EmbedSpec(embed.model, weights, embedder["weights_sha256"])
        embedder["fields"] = ["clip_img", "clip_txt"] if src.captions else ["clip_img"]
    fingerprint = _fingerprint(src, shard_size, resolution, image_format, quality, embedder)
    murl = manifest_url_for(out)
    if storage.exists(murl, settings):
        existing = parse_manifest(json.loads(storage.read_bytes(murl, settings)), murl)
        if existing.fingerprint == fingerprint and not overwrite:
            log.info("%s already holds this dataset (%d shards); nothing to do", out, len(existing.shards))
            return PrepareResult(existing, 0, len(existing.shards), time.monotonic() - t0)
        if not overwrite:
            raise FileExistsError(
                f"out: {out} already holds a different dataset (manifest fingerprint {existing.fingerprint[:12]}, "
                f"this job {fingerprint[:12]}); choose another --out or pass --overwrite"
            )
        storage.delete_prefix(murl, settings)  # the dataset is incomplete until the new manifest lands

    num_shards = (src.num_samples + shard_size - 1) // shard_size
    ranges = [(i, i * shard_size, min((i + 1) * shard_size, src.num_samples)) for i in range(num_shards)]
    infos: dict[int, ShardInfo] = {}
    for index, _, _ in ranges:
        info = _committed(out, index, fingerprint, settings)
        if info is not None:
            infos[index] = info
    reused = len(infos)
    todo = [r for r in ranges if r[0] not in infos]
    bar = tqdm(total=len(ranges), initial=reused, unit="shard", desc=f"prepare {out}", disable=not progress)
    done_samples = 0
    t_start = time.monotonic()

    def _started() -> None:  # the rate counts from when shards start, not from Ray's start-up
        nonlocal t_start
        t_start = time.monotonic()

    def _advance(info: ShardInfo, index: int) -> None:
        nonlocal done_samples
        infos[index] = info
        done_samples += info.samples
        bar.update(1)
        bar.set_postfix(samples_per_s=f"{done_samples / max(time.monotonic() - t_start, 1e-9):.0f}")

    try:
        job = (resolution, image_format, quality, fingerprint, settings, embed)
        if todo and workers == 0:
            for index, start, stop in todo:
                _advance(_shard_task(src, out, index, start, stop, *job), index)
        elif todo:
            _run_on_ray(todo, src, out, job, workers, ray_address, stall_timeout_s, _started, _advance)
    finally:
        bar.close()

    sides = {infos[i].resolution for i, _, _ in ranges}
    manifest = Manifest(
        url=murl,
        shards=tuple(infos[i] for i, _, _ in ranges),
        num_samples=src.num_samples,
        resolution=sides.pop() if len(sides) == 1 else None,  # None: mixed sizes
        classes=tuple(src.classes),
        image_format=image_format,
        source=src.describe(),
        fingerprint=fingerprint,
        shard_size=shard_size,
        captions=src.captions,
        embedder=embedder,
    )
    write_manifest(manifest, settings)  # last: the dataset is complete from here on
    return PrepareResult(manifest, len(todo), reused, time.monotonic() - t0)


def _run_on_ray(
    todo: list[tuple[int, int, int]],
    src: Source,
    out: str,
    job: tuple,
    workers: int | None,
    ray_address: str | None,
    stall_timeout_s: float,
    started_cb: Any,
    advance: Any,
) -> None:
    import ray

    started = ensure_ray(ray_address, num_cpus=workers)
    try:
        task = ray.remote(num_cpus=1, max_retries=2)(_shard_task)
        src_ref = ray.put(src)  # shipped once; array sources are shared zero-copy
        in_flight_limit = max(1, workers or int(ray.cluster_resources().get("CPU", 1))) * 2
        pending: dict[Any, int] = {}
        queue = list(todo)
        started_cb()
        while queue or pending:
            while queue and len(pending) < in_flight_limit:
                index, start, stop = queue.pop(0)
                ref = task.remote(src_ref, out, index, start, stop, *job)
                pending[ref] = index
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=stall_timeout_s)
            if not ready:
                raise TimeoutError(
                    f"prepare: no shard finished in {stall_timeout_s:.0f} s (waiting on shards "
                    f"{sorted(pending.values())[:8]}); the cluster may lack free CPUs"
                )
            for ref in ready:
                index = pending.pop(ref)
                try:
                    info = ray.get(ref, timeout=stall_timeout_s)
                except ray.exceptions.RayTaskError as exc:
                    for other in pending:
                        ray.cancel(other)
                    raise exc.as_instanceof_cause() from None
                advance(info, index)
    finally:
        if started:
            ray.shutdown()
