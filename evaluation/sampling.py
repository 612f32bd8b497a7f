"""Distributed, resumable sample generation: images addressed by index, one seed per image.

Sample ``i`` is made from seed ``sample_seed(eval_seed, i)`` alone, and the batches are fixed
slices of each shard, so the set of images (bit for bit) does not depend on how many workers
made it or in which order. Shard ``k`` holds samples ``[k * S, (k + 1) * S)`` as a tar of PNGs
(WebDataset layout: ``{index:08d}.png`` + ``{index:08d}.json``), written atomically; a finished
shard is never regenerated, so an interrupted evaluation resumes where it stopped.

A ``SampleFn`` is ``sample_fn(indices, seeds) -> uint8 images (B, H, W, C)`` or
``(images, labels)``; the workers build one each with a picklable ``builder()``.
"""

from __future__ import annotations

import functools
import io
import json
import tarfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from evaluation.pool import run_on_pool
from evaluation.seeds import sample_seed, sample_seeds  # re-exported: seeds live in a Ray-free module
from pipeline.data import storage

__all__ = [
    "GenerationReport",
    "SampleFn",
    "ShardSpec",
    "generate_samples",
    "plan_shards",
    "read_sample_shard",
    "read_samples",
    "sample_seed",
    "sample_seeds",
    "shard_name",
    "write_openai_npz",
]

SampleFn = Callable[[np.ndarray, np.ndarray], "np.ndarray | tuple[np.ndarray, np.ndarray]"]
SPEC_FILE = "spec.json"


@dataclass(frozen=True)
class ShardSpec:
    index: int
    start: int
    stop: int

    @property
    def count(self) -> int:
        return self.stop - self.start


def shard_name(index: int) -> str:
    return f"samples-{index:06d}.tar"


def plan_shards(num_samples: int, samples_per_shard: int) -> list[ShardSpec]:
    if num_samples < 1:
        raise ValueError(f"num_samples: {num_samples!r} is not allowed; it must be >= 1")
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard: {samples_per_shard!r} is not allowed; it must be >= 1")
    return [
        ShardSpec(k, start, min(start + samples_per_shard, num_samples))
        for k, start in enumerate(range(0, num_samples, samples_per_shard))
    ]


# ---------------------------------------------------------------------------------------------
# Shard format


def _check_images(images: np.ndarray, count: int) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[0] != count or images.shape[-1] not in (1, 3):
        raise ValueError(
            f"sample_fn returned {images.dtype} {images.shape}; expected uint8 ({count}, H, W, 1|3) images"
        )
    return images


def encode_sample_shard(indices: Sequence[int], seeds: Sequence[int], images: np.ndarray,
                        labels: Sequence[int] | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for j, index in enumerate(indices):
            png = io.BytesIO()
            image = images[j][..., 0] if images.shape[-1] == 1 else images[j]
            Image.fromarray(image).save(png, format="PNG")
            meta = {"index": int(index), "seed": int(seeds[j])}
            if labels is not None:
                meta["label"] = int(labels[j])
            for suffix, payload in (("png", png.getvalue()), ("json", json.dumps(meta).encode())):
                info = tarfile.TarInfo(f"{int(index):08d}.{suffix}")
                info.size = len(payload)
                info.mtime = 0
                tar.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


def read_sample_shard(data: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``(indices, images (B, H, W, C) uint8, labels or None)`` of one sample shard."""
    images: dict[int, np.ndarray] = {}
    labels: dict[int, int] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
        for member in tar.getmembers():
            key, _, suffix = member.name.partition(".")
            payload = tar.extractfile(member).read()
            if suffix == "png":
                array = np.asarray(Image.open(io.BytesIO(payload)))
                images[int(key)] = array[..., None] if array.ndim == 2 else array
            elif suffix == "json":
                meta = json.loads(payload)
                if "label" in meta:
                    labels[int(key)] = meta["label"]
    order = sorted(images)
    stacked = np.stack([images[i] for i in order]) if order else np.zeros((0, 0, 0, 3), np.uint8)
    label_array = np.array([labels[i] for i in order], np.int64) if labels else None
    return np.array(order, np.int64), stacked, label_array


# ---------------------------------------------------------------------------------------------
# Generation on the actor pool


@dataclass(frozen=True)
class GenerationReport:
    generated: tuple[int, ...]  # shard indices made by this call
    skipped: tuple[int, ...]  # shard indices that were already complete
    seconds: float
    images_per_second: float


def _generate_shard(sample_fn: SampleFn, shard: ShardSpec, out_url: str, batch_size: int, eval_seed: int) -> float:
    start_time = time.perf_counter()
    indices = np.arange(shard.start, shard.stop)
    seeds = sample_seeds(eval_seed, indices)
    images, labels = [], []
    for lo in range(0, len(indices), batch_size):
        out = sample_fn(indices[lo : lo + batch_size], seeds[lo : lo + batch_size])
        batch_images, batch_labels = out if isinstance(out, tuple) else (out, None)
        images.append(_check_images(batch_images, len(indices[lo : lo + batch_size])))
        if batch_labels is not None:
            labels.append(np.asarray(batch_labels))
    all_labels = np.concatenate(labels) if labels else None
    payload = encode_sample_shard(indices, seeds, np.concatenate(images), all_labels)
    storage.write_bytes(storage.join(out_url, shard_name(shard.index)), payload)
    return time.perf_counter() - start_time


def _check_spec(out_url: str, spec: dict) -> None:
    url = storage.join(out_url, SPEC_FILE)
    if storage.exists(url):
        stored = json.loads(storage.read_bytes(url))
        if stored != spec:
            diff = {k: (stored.get(k), spec.get(k)) for k in set(stored) | set(spec) if stored.get(k) != spec.get(k)}
            raise ValueError(
                f"{url}: existing samples were made with other settings {diff} "
                "(stored, requested); choose another evaluation name or delete that folder"
            )
    else:
        storage.write_bytes(url, json.dumps(spec, indent=2, sort_keys=True).encode())


def generate_samples(
    builder: Callable[[], SampleFn],
    out_url: str,
    num_samples: int,
    eval_seed: int = 0,
    batch_size: int = 64,
    samples_per_shard: int = 1000,
    num_workers: int = 1,
    cpus_per_worker: float = 1.0,
    gpus_per_worker: float = 0.0,
    spec: dict | None = None,
    timeout_s: float = 3600.0,
    progress: bool = True,
    ray_address: str | None = None,
) -> GenerationReport:
    """Make samples ``0 .. num_samples-1`` under ``out_url``, skipping shards that already exist.

    ``spec`` (JSON-able: checkpoint, sampler, steps, ...) is stored beside the shards; resuming
    with different settings is refused, so one folder never mixes two sample sets.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size: {batch_size!r} is not allowed; it must be >= 1")
    full_spec = dict(spec or {}, eval_seed=int(eval_seed), samples_per_shard=int(samples_per_shard),
                     batch_size=int(batch_size))
    _check_spec(out_url, full_spec)
    shards = plan_shards(num_samples, samples_per_shard)
    todo = [s for s in shards if not storage.exists(storage.join(out_url, shard_name(s.index)))]
    skipped = tuple(s.index for s in shards if s not in todo)
    start = time.perf_counter()
    task = functools.partial(_generate_shard, out_url=out_url, batch_size=batch_size, eval_seed=eval_seed)
    done = []
    for shard, _seconds in run_on_pool(
        builder, task, todo, num_workers=num_workers, cpus_per_worker=cpus_per_worker,
        gpus_per_worker=gpus_per_worker, timeout_s=timeout_s, progress="sampling" if progress else None,
        units=lambda s: s.count, ray_address=ray_address,
    ):
        done.append(shard.index)
    seconds = time.perf_counter() - start
    made = sum(s.count for s in todo)
    return GenerationReport(tuple(sorted(done)), skipped, seconds, made / seconds if made and seconds > 0 else 0.0)


def read_samples(out_url: str, num_samples: int, samples_per_shard: int) -> Iterator[np.ndarray]:
    """The uint8 images of samples ``0 .. num_samples-1``, one shard at a time, in index order."""
    for shard in plan_shards(num_samples, samples_per_shard):
        url = storage.join(out_url, shard_name(shard.index))
        indices, images, _ = read_sample_shard(storage.read_bytes(url))
        if not np.array_equal(indices, np.arange(shard.start, shard.stop)):
            raise ValueError(f"{url}: holds indices {indices[:3]}..., expected "
                             f"{shard.start}..{shard.stop - 1}")
        yield images


def write_openai_npz(out_url: str, num_samples: int, samples_per_shard: int, name: str = "samples.npz") -> str:
    """All samples as one ``.npz`` in the openai/guided-diffusion reference-batch format.

    ``arr_0``: (N, H, W, 3) uint8; ``arr_1``: (N,) int64 labels for class-conditional samples.
    """
    images, labels = [], []
    for shard in plan_shards(num_samples, samples_per_shard):
        data = storage.read_bytes(storage.join(out_url, shard_name(shard.index)))
        _, shard_images, shard_labels = read_sample_shard(data)
        images.append(shard_images if shard_images.shape[-1] == 3 else np.repeat(shard_images, 3, axis=-1))
        if shard_labels is not None:
            labels.append(shard_labels)
    arrays = {"arr_0": np.concatenate(images)}
    if labels:
        arrays["arr_1"] = np.concatenate(labels)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    url = storage.join(out_url, name)
    storage.write_bytes(url, buffer.getvalue())
    return url

