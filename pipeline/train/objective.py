"""The training objective as one module that DeepSpeed wraps: network + loss -> per-example losses.

The engine's forward is the whole loss computation, so ZeRO-3 gathers every parameter the loss
touches (the network's, and the learned noise schedule of VDM) through its module hooks.
Timesteps and noise are drawn by the training loop from its seeded generator and passed in
(discrete objectives), or drawn by the continuous objective from that same generator.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import DiffusionConfig

__all__ = ["TrainModule", "build_train_module", "classifier_losses", "is_discrete"]

_DISCRETE = ("ddpm", "classifier")


def is_discrete(diffusion: DiffusionConfig) -> bool:
    return diffusion.objective in _DISCRETE


def classifier_losses(classifier: nn.Module, schedule, x0: torch.Tensor, t_index: torch.Tensor,
                      noise: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """ADM sec. 4 (classifier guidance): cross-entropy of a classifier on noised x_t, per example."""
    from pipeline.diffusion.gaussian import model_timesteps, q_sample

    if y is None:
        raise ValueError("y: None is not allowed for the classifier objective; the data must carry labels "
                         "(set data.require_labels=true)")
    logits = classifier(q_sample(schedule, x0, t_index, noise), model_timesteps(schedule, t_index))
    return F.cross_entropy(logits.float(), y, reduction="none")


class TrainModule(nn.Module):
    """``forward(x0, y, t_index, noise, generator) -> (B,)`` losses for one objective.

    ``net`` is the network being trained (what EMA, evaluation and export care about);
    ``objective`` holds the loss's own parameters (VDM's learned schedule) or is None.
    """

    def __init__(self, net: nn.Module, diffusion: DiffusionConfig):
        super().__init__()
        self.net = net
        self.kind = diffusion.objective
        self.diffusion = diffusion
        self.objective: nn.Module | None = None
        self.schedule = None
        if is_discrete(diffusion):
            from pipeline.diffusion import build_schedule

            self.schedule = build_schedule(diffusion.schedule, diffusion.timesteps)
        else:
            from pipeline.diffusion import make_continuous_objective

            self.objective = make_continuous_objective(diffusion.objective, dict(diffusion.options))

    @property
    def num_timesteps(self) -> int | None:
        return self.schedule.num_timesteps if self.schedule is not None else None

    def forward(self, x0: torch.Tensor, y: torch.Tensor | None, t_index: torch.Tensor | None,
                noise: torch.Tensor | None, generator: torch.Generator | None = None) -> torch.Tensor:
        net = _FloatOutput(self.net)
        if self.kind == "classifier":
            return classifier_losses(self.net, self.schedule, x0, t_index, noise, y)
        if self.kind == "ddpm":
            from pipeline.diffusion import training_losses

            d = self.diffusion
            out = training_losses(net, self.schedule, x0, t_index, noise, y, parameterization=d.parameterization,
                                  variance=d.variance, loss_type=d.loss, vlb_weight=d.vlb_weight)
            return _per_example(out)
        return self.objective(net, x0, y, generator=generator)


class _FloatOutput:
    """The network's output in fp32, so losses are computed in full precision under autocast."""

    def __init__(self, net: nn.Module):
        self.net = net

    def __call__(self, x, t, y=None, **kwargs):
        return self.net(x, t, y, **kwargs).float()


def _per_example(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    loss = getattr(out, "loss", None)
    if isinstance(loss, torch.Tensor):
        return loss
    raise TypeError(f"training_losses returned {type(out).__name__}; expected a (B,) tensor or a result with .loss")


def build_train_module(net: nn.Module, diffusion: DiffusionConfig) -> TrainModule:
    return TrainModule(net, diffusion)
