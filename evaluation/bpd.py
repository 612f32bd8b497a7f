"""Bits/dim over held-out shards, on the actor pool, for every objective that has a likelihood.

The registry gives each objective's estimate (``ObjectiveSpec.likelihood``): the full-chain
variational bound of the discrete objective, the probability-flow ODE likelihood of the score
SDEs (uniform dequantization, Hutchinson divergence), VDM's continuous VLB. Each image's noise
comes from its own seed (eval seed, shard position, image position; the batch's first seed for
the batch-level ODE draws), and the batches are fixed by the shards, so the estimate does not
depend on the number of workers. Reported as the mean over images with its standard error
(sample standard deviation / sqrt(N)).

NCSN has no estimate, on purpose: its network is trained at its L noise levels only, with a largest
level (sigma_max = 1 by default) comparable to the data's range, so the model defines no density:
a probability-flow ODE would query the untrained levels in between and assume a N(0, sigma_max^2)
prior that p_{sigma_max} is far from, and annealed Langevin has no tractable bound (Song & Ermon
2019 report none). Train the VE SDE (``ve_sde``), its continuous-time form, for bits/dim.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from evaluation.model_sampling import from_uint8
from evaluation.pool import run_on_pool
from evaluation.reference import ShardItem, dataset_manifest, leading_shards, read_shard_images
from pipeline.diffusion import registry

__all__ = ["CheckpointModel", "LikelihoodModel", "bits_per_dim", "bpd_seed", "check_likelihood", "mean_and_stderr"]


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


def check_likelihood(diffusion: dict[str, Any]) -> None:
    """ValueError unless the objective has a likelihood estimate in the registry."""
    allowed = [n for n, spec in registry.OBJECTIVES.items() if spec.likelihood is not None]
    if diffusion["objective"] not in allowed:
        raise ValueError(f"diffusion.objective: {diffusion['objective']!r} has no likelihood estimate (bits/dim); "
                         f"objectives with one: {', '.join(allowed)}")


@dataclass(frozen=True)
class LikelihoodModel:
    """What a bits/dim worker holds: the sampling view and the objective's likelihood estimate."""

    view: Any
    likelihood: Any  # (view, x0, y, seeds) -> bits/dim (B,)
    image_size: int
    num_classes: int
    device: Any


@dataclass(frozen=True)
class CheckpointModel:
    """Picklable builder of a :class:`LikelihoodModel` from one EMA of a checkpoint."""

    run_url: str
    checkpoint: int
    ema_rate: float | None
    model: dict[str, Any]
    diffusion: dict[str, Any]

    def __post_init__(self) -> None:
        check_likelihood(self.diffusion)

    def __call__(self) -> LikelihoodModel:
        from pipeline.config import DiffusionConfig
        from pipeline.loading import from_weights
        from pipeline.train.checkpoint import load_ema_weights

        device = "cuda" if torch.cuda.is_available() else "cpu"  # a worker sees a GPU only when given one
        weights = load_ema_weights(self.run_url, self.checkpoint, self.ema_rate)[0]
        where = f"checkpoint {self.checkpoint} of {self.run_url}"
        d = DiffusionConfig.model_validate(self.diffusion)
        net, objective = from_weights(self.model, d, weights, where, device)
        num_classes = int(getattr(net.config, "num_classes", 0) or 0)
        view = registry.make_view(d.objective, net, objective, d.objective_options())
        return LikelihoodModel(view, registry.OBJECTIVES[d.objective].likelihood, int(net.config.image_size),
                               num_classes, device)


def _shard_bpd(state: LikelihoodModel, item: tuple[int, ShardItem], eval_seed: int, batch_size: int) -> np.ndarray:
    shard, shard_item = item
    images, labels = read_shard_images(dataclasses.replace(shard_item, resolution=state.image_size))
    if len(images) == 0:
        return np.zeros(0)
    if state.num_classes and labels is None:
        raise ValueError(f"{shard_item.url}: the model is class-conditional but the shard has no 'cls' labels")
    x0_all = from_uint8(images, state.device)
    totals = []
    for lo in range(0, len(images), batch_size):
        x0 = x0_all[lo : lo + batch_size]
        seeds = torch.tensor([bpd_seed(eval_seed, shard, j) for j in range(lo, lo + len(x0))])
        y = None
        if labels is not None and state.num_classes:
            y = torch.from_numpy(labels[lo : lo + batch_size]).to(state.device)
        totals.append(state.likelihood(state.view, x0, y, seeds).double().cpu().numpy())
    return np.concatenate(totals)


def bits_per_dim(
    builder,
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
    """``{"bpd", "bpd_stderr", "bpd_count", "bpd_dataset_sha256"}`` of the first ``max_images`` images;
    ``builder()`` gives each worker its :class:`LikelihoodModel` (e.g. :class:`CheckpointModel`)."""
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
