"""Bits/dim: the core's full-chain variational bound over held-out shards, on the actor pool.

Each image's bound uses noise from its own seed (eval seed, shard position, image position), so
the estimate does not depend on the number of workers. Reported as the mean over images with
its standard error (sample standard deviation / sqrt(N)).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from evaluation.model_sampling import check_discrete, load_ema_model
from evaluation.pool import run_on_pool
from evaluation.reference import ShardItem, dataset_manifest, leading_shards, read_shard_images
from pipeline.diffusion.likelihood import vlb_bits_per_dim
from pipeline.diffusion.schedules import build_schedule

__all__ = ["CheckpointModel", "bits_per_dim", "bpd_seed", "mean_and_stderr"]


def bpd_seed(eval_seed: int, shard: int, position: int) -> int:
    state = np.random.SeedSequence([int(eval_seed) & 0xFFFFFFFF, 0xB9D, int(shard), int(position)]).generate_state(2)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


def mean_and_stderr(values: np.ndarray) -> tuple[float, float]:
    """Sample mean and its standard error s / sqrt(N) (0 for a single value)."""
    values = np.asarray(values, np.float64)
    if values.size == 0:
        raise ValueError("mean_and_stderr: no values")
    stderr = float(values.std(ddof=1) / math.sqrt(values.size)) if values.size > 1 else 0.0
    return float(values.mean()), stderr


@dataclass(frozen=True)
class CheckpointModel:
    """Picklable builder of ``(model, diffusion settings)`` from one EMA of a checkpoint."""

    run_url: str
    checkpoint: int
    ema_rate: float | None
    model: dict[str, Any]
    diffusion: dict[str, Any]

    def __post_init__(self) -> None:
        check_discrete(self.diffusion)

    def __call__(self) -> tuple[torch.nn.Module, dict[str, Any]]:
        device = "cuda" if torch.cuda.is_available() else "cpu"  # a worker sees a GPU only when given one
        return load_ema_model(self.run_url, self.checkpoint, self.ema_rate, self.model).to(device), self.diffusion


def _shard_bpd(state, item: tuple[int, ShardItem], eval_seed: int, batch_size: int) -> np.ndarray:
    model, diffusion = state
    shard, shard_item = item
    size = int(model.config.image_size)
    images, labels = read_shard_images(dataclasses.replace(shard_item, resolution=size))
    if len(images) == 0:
        return np.zeros(0)
    if int(getattr(model.config, "num_classes", 0) or 0) and labels is None:
        raise ValueError(f"{shard_item.url}: the model is class-conditional but the shard has no 'cls' labels")
    schedule = build_schedule(diffusion["schedule"], diffusion["timesteps"])
    device = next(model.parameters()).device
    x0_all = torch.from_numpy(images).permute(0, 3, 1, 2).float().to(device) / 127.5 - 1
    totals = []
    for lo in range(0, len(images), batch_size):
        x0 = x0_all[lo : lo + batch_size]
        seeds = [bpd_seed(eval_seed, shard, j) for j in range(lo, lo + len(x0))]
        y = None
        if labels is not None and getattr(model.config, "num_classes", 0):
            y = torch.from_numpy(labels[lo : lo + batch_size]).to(device)
        out = vlb_bits_per_dim(model, schedule, x0, seeds=seeds, y=y, parameterization=diffusion["parameterization"],
                               variance=diffusion["variance"])
        totals.append(out.total.double().cpu().numpy())
    return np.concatenate(totals)


def bits_per_dim(
    builder: CheckpointModel,
    dataset_url: str,
    max_images: int = 1000,
    eval_seed: int = 0,
    batch_size: int = 64,
    num_workers: int = 1,
    cpus_per_worker: float = 1.0,
    gpus_per_worker: float = 0.0,
    timeout_s: float = 3600.0,
    progress: bool = True,
    ray_address: str | None = None,
) -> dict[str, Any]:
    """``{"bpd", "bpd_stderr", "bpd_count", "bpd_dataset_sha256"}`` of the first ``max_images`` images."""
    _, manifest_sha, shards = dataset_manifest(dataset_url)
    items = list(enumerate(leading_shards(shards, max_images)))
    task = functools.partial(_shard_bpd, eval_seed=eval_seed, batch_size=batch_size)
    per_shard: dict[int, np.ndarray] = {}
    for item, totals in run_on_pool(builder, task, items, num_workers=num_workers, cpus_per_worker=cpus_per_worker,
                                    gpus_per_worker=gpus_per_worker, timeout_s=timeout_s,
                                    progress="bits/dim" if progress else None,
                                    units=lambda it: it[1].limit or 1, ray_address=ray_address):
        per_shard[item[0]] = totals
    values = np.concatenate([per_shard[k] for k in sorted(per_shard)])[:max_images]
    mean, stderr = mean_and_stderr(values)
    return {"bpd": mean, "bpd_stderr": stderr, "bpd_count": int(values.size), "bpd_dataset_sha256": manifest_sha}
