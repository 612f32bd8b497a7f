"""A ``sample_fn(indices, seeds) -> uint8 images`` from a model and sampler settings.

The core's samplers draw every noise tensor from the sample's own seed
(``pipeline.diffusion.samplers.noise_from_seeds``), so image ``i`` depends on its seed only.
Class labels of a class-conditional model are drawn from the same seed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from pipeline.diffusion.samplers import ddim_sample, ddpm_sample
from pipeline.diffusion.schedules import build_schedule, respace

__all__ = [
    "SAMPLERS",
    "CheckpointSampleFn",
    "SamplerSettings",
    "check_discrete",
    "labels_from_seeds",
    "load_ema_model",
    "make_sample_fn",
    "to_uint8",
]

SAMPLERS = ("ddim", "ddpm")


@dataclass(frozen=True)
class SamplerSettings:
    """How samples are drawn; recorded in metrics.json."""

    sampler: str = "ddim"
    steps: int = 50
    eta: float = 0.0
    guidance_scale: float = 0.0
    classifier_scale: float = 0.0
    clip_denoised: bool = True

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler: {self.sampler!r} is not allowed; available here: {', '.join(SAMPLERS)}")
        if self.steps < 1:
            raise ValueError(f"steps: {self.steps!r} is not allowed; it must be >= 1")
        if self.guidance_scale or self.classifier_scale:
            raise ValueError(
                f"guidance_scale={self.guidance_scale}, classifier_scale={self.classifier_scale}: guided sampling "
                "is not available in evaluation yet; use 0"
            )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> (B, H, W, C) uint8, rounding to the nearest level."""
    return ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def labels_from_seeds(seeds: np.ndarray, num_classes: int) -> np.ndarray:
    """One uniform class label per sample, from its seed alone."""
    return np.array([np.random.default_rng([int(s), 1]).integers(num_classes) for s in seeds], dtype=np.int64)


def make_sample_fn(
    model: torch.nn.Module,
    settings: SamplerSettings,
    schedule: str = "linear",
    timesteps: int = 1000,
    parameterization: str = "eps",
    variance: str = "fixed_large",
    device: str | torch.device = "cpu",
):
    """``sample_fn(indices, seeds)`` drawing images with ``settings`` from ``model``.

    The model's ``config`` (``image_size``, ``in_channels``, ``num_classes``) gives the shape and
    whether labels are drawn.
    """
    config = model.config
    full = build_schedule(schedule, timesteps)
    if settings.sampler == "ddim":
        sched = respace(full, f"ddim{settings.steps}")
    else:
        sched = full if settings.steps == timesteps else respace(full, settings.steps)
    num_classes = int(getattr(config, "num_classes", 0) or 0)
    shape = (int(config.in_channels), int(config.image_size), int(config.image_size))
    model = model.to(device).eval()

    @torch.no_grad()
    def sample_fn(indices: np.ndarray, seeds: np.ndarray):
        seeds_t = torch.as_tensor(np.asarray(seeds, np.int64))
        labels = labels_from_seeds(seeds, num_classes) if num_classes else None
        y = torch.as_tensor(labels, device=device) if labels is not None else None
        common = dict(seeds=seeds_t, y=y, clip_denoised=settings.clip_denoised, parameterization=parameterization,
                      variance=variance, device=device)
        if settings.sampler == "ddim":
            x = ddim_sample(model, sched, (len(seeds_t), *shape), eta=settings.eta, **common)
        else:
            x = ddpm_sample(model, sched, (len(seeds_t), *shape), **common)
        images = to_uint8(x)
        return (images, labels) if labels is not None else images

    return sample_fn


def load_ema_model(
    run_url: str, checkpoint: int | str, ema_rate: float | None, model: dict[str, Any]
) -> torch.nn.Module:
    """The network of ``model`` (a ModelConfig dict) with one EMA of a committed checkpoint, in eval mode."""
    from pipeline.config import ModelConfig
    from pipeline.export import network_state_dict
    from pipeline.models import build_model_from_config
    from pipeline.train.checkpoint import load_ema_weights

    weights, _ = load_ema_weights(run_url, checkpoint, ema_rate)
    torch.manual_seed(0)  # building initialises weights that are then replaced; keep it deterministic
    network = build_model_from_config(ModelConfig.model_validate(model))
    try:
        network.load_state_dict(network_state_dict(weights), strict=True)
    except RuntimeError as exc:
        raise ValueError(f"checkpoint {checkpoint} of {run_url}: its EMA weights do not fit the configured network: "
                         f"{str(exc).splitlines()[0]}") from None
    return network.eval()


def check_discrete(diffusion: dict[str, Any]) -> None:
    if diffusion["objective"] != "ddpm":
        raise ValueError(f"diffusion.objective: {diffusion['objective']!r} is not supported by evaluation's "
                         "samplers yet; allowed: 'ddpm' (discrete-time)")


@dataclass(frozen=True)
class CheckpointSampleFn:
    """Picklable builder: each evaluation worker loads one EMA of a checkpoint and samples from it."""

    run_url: str
    checkpoint: int
    ema_rate: float | None
    model: dict[str, Any]  # pipeline.config.ModelConfig as a dict
    diffusion: dict[str, Any]  # pipeline.config.DiffusionConfig as a dict
    settings: SamplerSettings
    device: str = "cpu"

    def __post_init__(self) -> None:
        check_discrete(self.diffusion)

    def __call__(self):
        network = load_ema_model(self.run_url, self.checkpoint, self.ema_rate, self.model)
        return make_sample_fn(
            network, self.settings, schedule=self.diffusion["schedule"], timesteps=self.diffusion["timesteps"],
            parameterization=self.diffusion["parameterization"], variance=self.diffusion["variance"],
            device=self.device,
        )
