"""The training objective as one module that DeepSpeed wraps: network + objective -> per-example losses.

The engine's forward is the whole loss computation, so ZeRO-3 gathers every parameter the loss
touches (the network's, and an objective's own such as VDM's learned schedule) through its
module hooks. Every objective of the registry has the same call, ``training_loss(net, x0, y,
generator=)``, and draws its timesteps and noise from the generator the loop gives it.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.config import DiffusionConfig
from pipeline.diffusion.objectives import ObjectiveLoss
from pipeline.diffusion.registry import build_objective

__all__ = ["TrainModule"]


class TrainModule(nn.Module):
    """``forward(x0, y, generator) -> ObjectiveLoss`` for the configured objective.

    ``net`` is the network being trained (what EMA, evaluation and export care about);
    ``objective`` is the registry's objective module (parameters of its own, e.g. VDM's schedule,
    are trained with the network and saved as ``objective.*``).
    """

    def __init__(self, net: nn.Module, diffusion: DiffusionConfig):
        super().__init__()
        self.net = net
        self.objective = build_objective(diffusion.objective, diffusion.objective_options())

    def forward(self, x0: torch.Tensor, y: torch.Tensor | None, generator: torch.Generator | None = None,
                cond: dict[str, torch.Tensor] | None = None) -> ObjectiveLoss:
        """``cond``: the batch's per-sample extras by name (data.fields, e.g. CLIP embeddings), passed
        on only when there are any (the objectives that need them take ``cond=``)."""
        if cond:
            return self.objective.training_loss(self.net, x0, y, generator=generator, cond=cond)
        return self.objective.training_loss(self.net, x0, y, generator=generator)
