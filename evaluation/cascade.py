"""Cascade sampling (ADM-U): the first stage's images, upsampled by a super-resolution model.

    up = load_model("exports/upsampler")
    big, info = upsample_images(up, small_uint8, seeds, labels, steps=50)

Image i of the second stage is drawn from ``stage_seed(seed_i)``, a hash of the first stage's
seed of that image, so it depends on that image alone (not on its batch or on the worker that
made it). At a sampling noise level s > 0 the low-resolution input is noised as in training
(z = sqrt(1 - s^2) x + s eps, eps from the same per-image seed) and s is given to the network.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from evaluation.model_sampling import from_uint8, to_uint8
from evaluation.seeds import sample_seed
from pipeline.diffusion import registry
from pipeline.diffusion.samplers import noise_from_seeds
from pipeline.diffusion.upsampler import UpsamplerObjective, low_res_side, noise_augment

__all__ = ["CascadeSampleFn", "check_upsampler", "resolve_upsampler", "stage_seed", "upsample_images"]

_STAGE = 1  # the second stage's seed: sample_seed(first stage seed, 1)
_AUGMENT = 2  # its sampling-time augmentation noise: sample_seed(first stage seed, 2)
SEED_RULE = "upsampled image i uses sample_seed(first stage seed of i, 1)"


def stage_seed(seed: int) -> int:
    """The upsampler's seed for an image whose first-stage seed is ``seed``."""
    return sample_seed(int(seed), _STAGE)


def check_upsampler(up: Any, low_res_size: int, num_classes: int = 0, *, sampler: str | None = None,
                    steps: int = 1, noise_level: float | None = None) -> None:
    """ValueError unless ``up`` (a :class:`pipeline.loading.TrainedModel`) upsamples ``low_res_size`` images
    with these sampling settings."""
    if not isinstance(up.objective, UpsamplerObjective):
        raise ValueError(f"--upsampler: the model's objective is {up.diffusion.objective!r}, not a super-resolution "
                         "one; give an export of a run trained with the upsampler objective")
    side = low_res_side(up.objective.low_res_size, int(up.network.config.image_size))
    if side != low_res_size:
        raise ValueError(f"--upsampler: it upsamples {side}x{side} images, the first stage makes "
                         f"{low_res_size}x{low_res_size}")
    up_classes = int(getattr(up.network.config, "num_classes", 0) or 0)
    if up_classes and num_classes and up_classes != num_classes:
        raise ValueError(f"--upsampler: it has {up_classes} classes, the first stage {num_classes}")
    if sampler is not None:
        registry.check_sampler_fits(up.diffusion.objective, sampler)
    if steps < 1:
        raise ValueError(f"--upsampler-steps: {steps} is not allowed; it must be >= 1")
    if noise_level is not None and not 0.0 <= noise_level < 1.0:
        raise ValueError(f"--upsampler-noise-level: {noise_level} is not allowed; expected 0 <= level < 1")


def upsample_images(up: Any, images: np.ndarray, seeds: Sequence[int], labels: Sequence[int] | None = None, *,
                    sampler: str | None = None, steps: int = 50, noise_level: float | None = None,
                    batch_size: int = 64, device: str | torch.device = "cpu") -> tuple[np.ndarray, dict[str, Any]]:
    """(N, h, w, C) uint8 first-stage images -> (N, H, W, C) uint8 upsampled ones, and the settings used."""
    sampler = sampler or registry.OBJECTIVES[up.diffusion.objective].default_sampler
    registry.check_sampler_fits(up.diffusion.objective, sampler)
    level = float(up.objective.sample_noise_level if noise_level is None else noise_level)
    if not 0.0 <= level < 1.0:
        raise ValueError(f"--upsampler-noise-level: {level} is not allowed; expected 0 <= level < 1")
    config = up.network.config
    conditional = bool(getattr(config, "num_classes", 0))
    net = up.network.to(device).eval()
    if not conditional:
        def net(x, t, y=None, _model=up.network, **cond):  # labels are the first stage's only
            return _model(x, t, None, **cond)
    view = up.view(net)
    up_seeds = [stage_seed(s) for s in seeds]
    shape = (int(config.in_channels), int(config.image_size), int(config.image_size))
    out = []
    for start in range(0, len(images), batch_size):
        stop = min(start + batch_size, len(images))
        low = from_uint8(images[start:stop], device)
        batch_seeds = torch.as_tensor(up_seeds[start:stop], dtype=torch.int64)
        if level > 0:
            aug_seeds = torch.as_tensor([sample_seed(int(s), _AUGMENT) for s in seeds[start:stop]], dtype=torch.int64)
            eps = noise_from_seeds(aug_seeds, tuple(low.shape[1:]), 0, device=device)
            low = noise_augment(low, torch.full((low.shape[0],), level, device=device), eps)
        y = (torch.as_tensor(list(labels[start:stop]), dtype=torch.long, device=device)
             if conditional and labels is not None else None)
        bound = view.with_net(view.net.with_low_res(low, level))
        with torch.no_grad():
            x = registry.sample(bound, sampler, (stop - start, *shape), batch_seeds, steps=steps, y=y, device=device)
        out.append(to_uint8(x))
    info = {"sampler": sampler, "steps": steps, "noise_level": level, "seed_rule": SEED_RULE,
            "source": dict(up.source)}
    return np.concatenate(out), info


def resolve_upsampler(source: str, checkpoint: str | int, ema_rate: float | None, low_res_size: int,
                      num_classes: int, *, sampler: str | None, steps: int,
                      noise_level: float | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load the second stage once (an export folder, or a run's checkpoint and EMA rate), check that it
    upsamples the first stage's ``low_res_size`` images with these settings (ValueError otherwise),
    and return (the reference the sampling workers load, its provenance for metrics.json)."""
    from pipeline.loading import load_model

    up = load_model(source, checkpoint=checkpoint, ema_rate=ema_rate)
    check_upsampler(up, low_res_size, num_classes, sampler=sampler, steps=steps, noise_level=noise_level)
    src = dict(up.source)
    ref = {"source": source, "checkpoint": src.get("images_seen") if src["kind"] == "checkpoint" else "latest",
           "ema_rate": src.get("ema_rate")}
    config = up.network.config
    record = {"source": src, "objective": up.diffusion.objective,
              "options": up.diffusion.objective_options().model_dump(mode="json"),
              "resolution": int(config.image_size), "low_res_size": low_res_size,
              "sampler": sampler or registry.OBJECTIVES[up.diffusion.objective].default_sampler, "steps": steps,
              "noise_level": float(up.objective.sample_noise_level if noise_level is None else noise_level),
              "seed_rule": SEED_RULE}
    return ref, record


@dataclass(frozen=True)
class CascadeSampleFn:
    """Picklable builder for the evaluation workers: the first stage's ``sample_fn``, every image of it
    then upsampled by the second stage (``upsampler``: what :func:`resolve_upsampler` returned), so the
    metrics are those of the cascade at the upsampler's resolution. Labels are the first stage's."""

    base: Callable[[], Callable]
    upsampler: dict[str, Any]
    sampler: str | None = None
    steps: int = 50
    noise_level: float | None = None
    batch_size: int = 64
    device: str = "cpu"

    def __call__(self):
        from pipeline.loading import load_model

        first = self.base()
        u = self.upsampler
        up = load_model(u["source"], checkpoint=u["checkpoint"], ema_rate=u["ema_rate"], device=self.device)

        def sample_fn(indices: np.ndarray, seeds: np.ndarray):
            out = first(indices, seeds)
            images, labels = out if isinstance(out, tuple) else (out, None)
            big, _ = upsample_images(up, images, [int(s) for s in seeds], labels, sampler=self.sampler,
                                     steps=self.steps, noise_level=self.noise_level, batch_size=self.batch_size,
                                     device=self.device)
            return big if labels is None else (big, labels)

        return sample_fn
