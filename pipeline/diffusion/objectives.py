"""The discrete-time training objectives as modules with the call every objective shares.

Every objective of the registry (:data:`pipeline.diffusion.OBJECTIVES`) is an ``nn.Module`` with
``training_loss(net, x0, y, generator=...) -> ObjectiveLoss``: per-example losses drawn with the
generator it is given (timesteps and noise here; times and noise in the continuous objectives),
so a training stream keyed on (run seed, rank, images seen) is the same wherever it is replayed.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .gaussian import model_timesteps, q_sample
from .losses import ImportanceSampler, training_losses
from .schedules import build_schedule

__all__ = ["ClassifierObjective", "DDPMObjective", "ObjectiveLoss", "FloatOutput", "PerExampleObjective"]


class ObjectiveLoss(NamedTuple):
    """What one training call returns; the training loop reduces it.

    ``loss`` (B,): per-example loss; ``weight`` (B,) or None: importance weights it is multiplied
    by before the mean; ``time`` (B,) in [0, 1]: each example's diffusion time (per-quartile logs);
    ``t_index`` (B,) or None: discrete steps (the importance sampler's history).
    """

    loss: Tensor
    time: Tensor | None = None
    weight: Tensor | None = None
    t_index: Tensor | None = None


class FloatOutput:
    """The network's output in fp32, so losses are computed in full precision under autocast."""

    def __init__(self, net):
        self.net = net

    def __call__(self, x, t, y=None, **kwargs):
        return self.net(x, t, y, **kwargs).float()


def _draw_t_noise(num_timesteps: int, x0: Tensor, generator: torch.Generator | None,
                  importance: ImportanceSampler | None) -> tuple[Tensor, Tensor | None, Tensor]:
    """Timestep indices, importance weights (or None) and noise, in that order from ``generator``."""
    n = x0.shape[0]
    device = generator.device if generator is not None else x0.device
    if importance is not None:
        t, weight = importance.sample(n, generator=generator)
        t, weight = t.to(x0.device), weight.to(x0.device, torch.float32)
    else:
        t = torch.randint(0, num_timesteps, (n,), generator=generator, device=device)
        weight = None
    noise = torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype)
    return t.to(x0.device), weight, noise.to(x0.device)


class DDPMObjective(nn.Module):
    """DDPM / Improved DDPM losses (L_simple, L_hybrid, L_vlb) with t ~ U{0..T-1} or importance-sampled t
    (Improved DDPM sec. 3.3; the sampler's history is fed by the training loop, which all-gathers it)."""

    def __init__(self, schedule: str, timesteps: int, parameterization: str, variance: str, loss: str,
                 vlb_weight: float, importance_sampling: bool = False):
        super().__init__()
        self.schedule = build_schedule(schedule, timesteps)
        self.parameterization, self.variance, self.loss_type, self.vlb_weight = (parameterization, variance, loss,
                                                                                 vlb_weight)
        self.importance = ImportanceSampler(timesteps) if importance_sampling else None

    @property
    def num_timesteps(self) -> int:
        return self.schedule.num_timesteps

    def training_loss(self, net, x0: Tensor, y: Tensor | None = None, *, generator=None) -> ObjectiveLoss:
        t, weight, noise = _draw_t_noise(self.num_timesteps, x0, generator, self.importance)
        out = training_losses(FloatOutput(net), self.schedule, x0, t, noise, y,
                              parameterization=self.parameterization, variance=self.variance,
                              loss_type=self.loss_type, vlb_weight=self.vlb_weight)
        return ObjectiveLoss(out.loss, t.float() / self.num_timesteps, weight, t)

    forward = training_loss


class ClassifierObjective(nn.Module):
    """ADM sec. 4 (classifier guidance): cross-entropy of a classifier on noised x_t, per example."""

    def __init__(self, schedule: str, timesteps: int):
        super().__init__()
        self.schedule = build_schedule(schedule, timesteps)
        self.importance = None

    @property
    def num_timesteps(self) -> int:
        return self.schedule.num_timesteps

    def training_loss(self, net, x0: Tensor, y: Tensor | None = None, *, generator=None) -> ObjectiveLoss:
        if y is None:
            raise ValueError("y: None is not allowed for the noisy-classifier objective; the data must carry "
                             "labels (set data.require_labels=true)")
        t, _, noise = _draw_t_noise(self.num_timesteps, x0, generator, None)
        logits = net(q_sample(self.schedule, x0, t, noise), model_timesteps(self.schedule, t))
        return ObjectiveLoss(F.cross_entropy(logits.float(), y, reduction="none"), t.float() / self.num_timesteps,
                             None, t)

    forward = training_loss


class PerExampleObjective:
    """Mixin of the continuous-time objectives, whose ``forward(model, x0, y, generator=)`` is the (B,)
    loss: gives them the shared ``training_loss`` call."""

    def training_loss(self, net, x0: Tensor, y: Tensor | None = None, *, generator=None) -> ObjectiveLoss:
        return ObjectiveLoss(self(FloatOutput(net), x0, y, generator=generator))
