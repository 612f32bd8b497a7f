"""Diffusion-based representation learning (Abstreiter, Mittal, Bauer, Schölkopf & Mehrjou 2021).

An encoder E_phi(x0) -> z in R^d conditions the denoising network, and both are trained together
by the denoising objective, so z must carry what the network needs to denoise x_t back to x0 (the
more so the noisier x_t); the code is then a representation of x0, judged by a linear probe
(``evaluation.probe``). Here the base objective is the discrete DDPM one (Ho et al. 2020, eq. 14,
or any DDPM-family loss of :class:`~pipeline.diffusion.objectives.DDPMObjective`), and z reaches
the U-Net through its vector-embedding input (``emb``, ``model.cond_embed_dim = d``), which adds
a projection of z to the timestep embedding and to the attention context.

Loss per example (Abstreiter et al. 2021, sec. 3, with the L1 regulariser on the code):
    L = L_DDPM(eps_theta(x_t, t, E_phi(x0))) + lambda_z ||E_phi(x0)||_1

The unconditional code is z = 0 (the U-Net's ``emb=None``): the training-time grid and any sampler
called without a code draw from the network at z = 0. :class:`CodeView` samples given codes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from .objectives import ObjectiveLoss
from .sampling import DiscreteView

__all__ = ["CodeView", "ConvEncoder", "RepresentationObjective", "code_l1_penalty", "with_code"]


def code_l1_penalty(z: Tensor) -> Tensor:
    """||z||_1 per example (Abstreiter et al. 2021, sec. 3: the L1 regulariser that keeps codes sparse)."""
    return z.abs().flatten(1).sum(dim=1)


def standardize_image(x: Tensor, eps: float = 1e-3) -> Tensor:
    """Each image's channels to zero mean and unit standard deviation over the pixels (instance norm)."""
    return (x - x.mean((2, 3), keepdim=True)) / (x.std((2, 3), keepdim=True) + eps)


class ConvEncoder(nn.Module):
    """E_phi: a small convolutional encoder, (B, C, H, W) in [-1, 1] -> (B, d).

    The input is standardised per image and channel first, so the code is not spent on the global
    colour statistics of an image (which the denoiser reads off x_t itself at all but the highest
    noise levels); then three 3x3 conv blocks (GroupNorm, SiLU; the last two halve the resolution), global average
    pooling (so the code does not depend on where in the image a feature is), and a linear map to d.
    """

    def __init__(self, in_channels: int, code_dim: int, channels: int = 32):
        super().__init__()
        if code_dim < 1:
            raise ValueError(f"code_dim: {code_dim!r} is not allowed; it must be >= 1")
        self.in_channels, self.code_dim = int(in_channels), int(code_dim)
        c1, c2 = channels, 2 * channels
        groups = max(g for g in (8, 4, 2, 1) if channels % g == 0)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3, padding=1), nn.GroupNorm(groups, c1), nn.SiLU(),
            nn.Conv2d(c1, c2, 3, stride=2, padding=1), nn.GroupNorm(groups, c2), nn.SiLU(),
            nn.Conv2d(c2, c2, 3, stride=2, padding=1), nn.GroupNorm(groups, c2), nn.SiLU(),
        )
        self.project = nn.Linear(c2, code_dim)

    def forward(self, x0: Tensor) -> Tensor:
        if x0.ndim != 4 or x0.shape[1] != self.in_channels:
            raise ValueError(f"x0: expected shape (B, {self.in_channels}, H, W) for the encoder "
                             f"(diffusion.options.image_channels), got {tuple(x0.shape)}")
        h = self.features(standardize_image(x0))
        return self.project(F.adaptive_avg_pool2d(h, 1).flatten(1))


def with_code(net: Callable[..., Tensor], z: Tensor | None) -> Callable[..., Tensor]:
    """``net`` with the code z passed as its vector embedding (``emb``); z None: ``net`` itself."""
    if z is None:
        return net

    def conditioned(x, t, y=None, **kwargs):
        return net(x, t, y, emb=z, **kwargs)

    return conditioned


def _code_dim_of(net) -> int | None:
    config = getattr(net, "config", None)
    return None if config is None else int(getattr(config, "cond_embed_dim", 0) or 0)


class RepresentationObjective(nn.Module):
    """The base objective (a module with ``training_loss``) with the network conditioned on E_phi(x0).

    ``encoder`` is a submodule, so its parameters train with the network, live under
    ``objective.encoder.*`` in checkpoints and EMA, and are exported in objective.safetensors.
    """

    def __init__(self, base: nn.Module, encoder: ConvEncoder, lambda_z: float):
        super().__init__()
        if not lambda_z >= 0:
            raise ValueError(f"lambda_z: {lambda_z!r} is not allowed; it must be >= 0")
        self.base, self.encoder, self.lambda_z = base, encoder, float(lambda_z)

    @property
    def schedule(self):
        return self.base.schedule

    @property
    def importance(self):  # Improved DDPM's importance sampler of the base, fed by the training loop
        return self.base.importance

    @property
    def num_timesteps(self) -> int:
        return self.base.num_timesteps

    def encode(self, x0: Tensor) -> Tensor:
        """z = E_phi(x0), (B, d)."""
        return self.encoder(x0)

    def loss_given_code(self, net, x0: Tensor, y: Tensor | None, z: Tensor | None, *,
                        generator=None) -> ObjectiveLoss:
        """The base loss with ``net`` conditioned on ``z`` plus lambda_z ||z||_1; z None withholds the
        code: exactly the base objective's loss (the same draws from ``generator``)."""
        out = self.base.training_loss(with_code(net, z), x0, y, generator=generator)
        if z is None:
            return out
        return out._replace(loss=out.loss + self.lambda_z * code_l1_penalty(z.float()))

    def training_loss(self, net, x0: Tensor, y: Tensor | None = None, *, generator=None) -> ObjectiveLoss:
        d = _code_dim_of(net)
        if d is not None and d != self.encoder.code_dim:
            raise ValueError(f"model.overrides.cond_embed_dim: {d} is not allowed with diffusion.options.code_dim "
                             f"{self.encoder.code_dim}; the network takes the code as its vector embedding, so "
                             f"set model.overrides.cond_embed_dim={self.encoder.code_dim}")
        return self.loss_given_code(net, x0, y, self.encode(x0), generator=generator)

    forward = training_loss


@dataclass(frozen=True)
class CodeView(DiscreteView):
    """A representation model as the discrete samplers see it: ``net`` at the unconditional code
    z = 0, ``encode(x0)`` its codes and :meth:`with_code` the view of the network given codes
    (one per sample: the batch the sampler draws must have as many samples as z has rows)."""

    encoder: nn.Module | None = None

    def encode(self, x0: Tensor) -> Tensor:
        if self.encoder is None:
            raise ValueError("encoder: this view has none (not a representation model)")
        return self.encoder(x0)

    def with_code(self, z: Tensor) -> DiscreteView:
        return DiscreteView(with_code(self.net, z), self.schedule, self.parameterization, self.variance)

    def with_net(self, net) -> CodeView:
        return dataclasses.replace(self, net=net)
