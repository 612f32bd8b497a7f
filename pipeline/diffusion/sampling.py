"""What a sampler sees of a trained model: one view per family of objectives.

A registry objective (``pipeline.diffusion.registry``) turns (network, objective module) into one
of these views; a registry sampler declares which views it can drive. Views with a noise-level
(sigma) form expose EDM's denoiser D(x; sigma) on x / alpha (Karras et al. 2022, sec. 2), so every
sigma-space sampler (Euler, Heun, DPM-Solver++, DDIM in sigma form) fits every such objective.

``net`` is the sampling-time network ``net(x, t_input, y) -> output``: classifier-free guidance
and label handling wrap it before the view is made (:meth:`with_net`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .fast_samplers import (
    Denoiser,
    denoiser_from_discrete,
    denoiser_from_score_fn,
    discrete_sigmas,
    karras_sigmas,
    round_sigmas,
)
from .schedules import Schedule

__all__ = ["DiscreteView", "Guide", "NCSNView", "SDEView", "SigmaView", "VDMView"]

# Score-SDE sampling stops at t = 1e-3 (Song et al. 2021, App. C).
SDE_T_EPS = 1e-3


@dataclass(frozen=True)
class Guide:
    """Per-call extras of a sampler: ADM classifier guidance and inpainting.

    ``cond_fn(x, t, y) -> grad log p(y | x_t)`` (scaled), for the discrete ancestral/DDIM steps;
    ``known`` data and a boolean ``mask`` (True where known) for inpainting.
    """

    cond_fn: Callable[..., Tensor] | None = None
    known: Tensor | None = None
    mask: Tensor | None = None

    @property
    def inpainting(self) -> bool:
        return self.known is not None


class SigmaView:
    """A view with EDM's noise-level form: ``denoiser(y)(x, sigma) = E[x0 | x / alpha at sigma]``."""

    def denoiser(self, y: Tensor | None) -> Denoiser:
        raise NotImplementedError

    def sigma_range(self) -> tuple[float, float]:
        raise NotImplementedError

    def snap(self, sigmas: Tensor) -> Tensor:
        """The levels a sampler may step to (identity for continuous-time models)."""
        return sigmas

    def karras(self, steps: int) -> Tensor:
        """EDM eq. 5 levels over the model's range, snapped to levels it was trained on."""
        lo, hi = self.sigma_range()
        return self.snap(karras_sigmas(steps, lo, hi))

    def with_net(self, net) -> Any:
        return dataclasses.replace(self, net=net)


@dataclass(frozen=True)
class DiscreteView(SigmaView):
    """A discrete-time model: the full training schedule, the output's parameterisation and variance."""

    net: Callable[..., Tensor]
    schedule: Schedule
    parameterization: str
    variance: str

    def denoiser(self, y):
        return denoiser_from_discrete(self.net, self.schedule, parameterization=self.parameterization, y=y)

    def sigma_range(self):
        levels = discrete_sigmas(self.schedule)
        return float(levels.min()), float(levels.max())

    def snap(self, sigmas):
        # EDM's round_sigma: levels snapped to the trained ones; duplicates (few trained levels) dropped
        sigmas = round_sigmas(sigmas, discrete_sigmas(self.schedule))
        return torch.cat([torch.unique_consecutive(sigmas[:-1]), sigmas[-1:]])


@dataclass(frozen=True)
class SDEView(SigmaView):
    """A score-SDE model: ``objective`` is its SDEObjective (the SDE and the output's parameterisation)."""

    net: Callable[..., Tensor]
    objective: nn.Module
    t_eps: float = SDE_T_EPS

    @property
    def sde(self):
        return self.objective.sde

    def score_fn(self, y):
        return self.objective.score_fn(self.net, y)

    def denoiser(self, y):
        return denoiser_from_score_fn(self.score_fn(y), self.sde)

    def ratio(self, t: Tensor) -> Tensor:
        """sigma(t) / alpha(t): the EDM noise level at SDE time t."""
        alpha, sigma = self.sde.marginal(t)
        return sigma / alpha

    def sigma_range(self):
        lo, hi = self.ratio(torch.tensor([self.t_eps, 1.0], dtype=torch.float64)).tolist()
        return lo, hi


@dataclass(frozen=True)
class NCSNView:
    """A noise-conditional score network on its geometric noise levels."""

    net: Callable[..., Tensor]
    objective: nn.Module

    def score_fn(self, y):
        return self.objective.score_fn(self.net, y)

    def with_net(self, net):
        return dataclasses.replace(self, net=net)


@dataclass(frozen=True)
class VDMView:
    """A VDM model with its (learned or fixed) noise schedule gamma."""

    net: Callable[..., Tensor]
    objective: nn.Module

    def with_net(self, net):
        return dataclasses.replace(self, net=net)
