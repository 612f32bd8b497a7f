"""Diffusion-based representation learning (Abstreiter, Mittal, Bauer, Schölkopf & Mehrjou 2021).

An encoder E_phi(x0) -> z in R^d conditions the denoising network, and both are trained together
by the denoising objective, so z must carry what the network needs to denoise x_t back to x0 (the
more so the noisier x_t); the code is then a representation of x0, judged by a linear probe
(``evaluation.probe``). The base objective is any module with ``training_loss(net, x0, y,
generator=)``: the discrete DDPM one (Ho et al. 2020, eq. 14, or any DDPM-family loss of
:class:`~pipeline.diffusion.objectives.DDPMObjective`) or denoising score matching on the VP,
sub-VP or VE SDE (:class:`~pipeline.diffusion.sde.SDEObjective`, the paper's own setting). z
reaches the U-Net through its vector-embedding input (``emb``, ``model.cond_embed_dim = d``),
which adds a projection of z to the timestep embedding and to the attention context.

Loss per example (Abstreiter et al. 2021, sec. 3, with the L1 regulariser on the code):
    L = L_base(net(x_t, t, E_phi(x0))) + lambda_z ||E_phi(x0)||_1
Variants (sec. 3.2/4): a time-dependent code E_phi(x0, t) (:class:`CodeHead` with
``time_dependent``), where t is the network's own time input (DDPM: the timestep index; VP and
sub-VP SDE: 999 t; VE SDE: log sigma(t)), so the code is computed inside the conditioned network
call, at the t the base drew; and a probabilistic encoder q(z | x0) = N(mu, sigma^2) (``gaussian``),
trained on z = mu + sigma * noise with lambda_z KL(q || N(0, I)) in place of the L1 term.

The unconditional code is z = 0 (the U-Net's ``emb=None``): the training-time grid and any sampler
called without a code draw from the network at z = 0. :class:`CodeView` (discrete base) and
:class:`SDECodeView` (SDE base) sample given codes or images.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.models.layers import timestep_embedding

from .objectives import ObjectiveLoss
from .sampling import DiscreteView, SDEView

__all__ = ["CodeHead", "CodeView", "ConvEncoder", "FixedTimeEncoder", "RepresentationObjective", "SDECodeView",
           "code_l1_penalty", "ddpm_time_input", "gaussian_kl", "with_code"]

Code = Tensor | Callable[[Tensor], Tensor]  # codes (B, d), or a function of the network's time input (B,) -> codes


def code_l1_penalty(z: Tensor) -> Tensor:
    """||z||_1 per example (Abstreiter et al. 2021, sec. 3: the L1 regulariser that keeps codes sparse)."""
    return z.abs().flatten(1).sum(dim=1)


def gaussian_kl(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, diag exp(logvar)) || N(0, I)) per example, summed over the code dimensions."""
    # closed form of the Gaussian KL to the standard normal (Kingma & Welling 2014, App. B)
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(dim=1)


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


def ddpm_time_input(num_timesteps: int, t: Tensor) -> Tensor:
    """The timestep a discrete model's network is called with at diffusion time t in [0, 1]:
    round(t (T - 1)), as a float (``gaussian.model_timesteps`` of the full training schedule)."""
    return torch.round(t.float().clamp(0, 1) * (num_timesteps - 1))


def _batch_times(t: Tensor, batch: int, device) -> Tensor:
    """The network's time input as (B,) float (a scalar or one-element t is repeated)."""
    t = torch.as_tensor(t, device=device).float().reshape(-1)
    return t.expand(batch) if t.numel() == 1 else t


class CodeHead(nn.Module):
    """E_phi(x0[, t]) for the variants: features (x0 -> (B, width), a :class:`ConvEncoder`), plus a
    sinusoidal embedding of the network's time input projected to ``width`` and added
    (``time_dependent``), SiLU, and a linear map to the code: (mu, log sigma^2) of a diagonal
    Gaussian (``gaussian``) or z itself. ``forward`` is the code used for probing, reconstruction
    and sampling: z, or the Gaussian's mean mu.

    The time embedding is the U-Net's own (``timestep_embedding``, on exactly what the network is
    given: DDPM timestep indices, 999 t for the VP SDEs, log sigma(t) for the VE SDE).
    """

    def __init__(self, features: nn.Module, width: int, code_dim: int, *, time_dependent: bool = False,
                 gaussian: bool = False, time_dim: int = 64):
        super().__init__()
        if code_dim < 1:
            raise ValueError(f"code_dim: {code_dim!r} is not allowed; it must be >= 1")
        self.features, self.width, self.code_dim = features, int(width), int(code_dim)
        self.in_channels = int(getattr(features, "in_channels", 0))
        self.time_dependent, self.gaussian, self.time_dim = bool(time_dependent), bool(gaussian), int(time_dim)
        self.time = nn.Linear(self.time_dim, self.width) if self.time_dependent else None
        self.head = nn.Linear(self.width, self.code_dim * (2 if self.gaussian else 1))

    def moments(self, x0: Tensor, t: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """(mu, log sigma^2) of q(z | x0[, t]); (z, None) for a deterministic head."""
        h = self.features(x0)
        if self.time is not None:
            if t is None:
                raise ValueError("t: a time-dependent encoder E_phi(x0, t) needs the network's time input")
            h = h + self.time(timestep_embedding(_batch_times(t, x0.shape[0], x0.device), self.time_dim).to(h.dtype))
        out = self.head(F.silu(h))
        if not self.gaussian:
            return out, None
        mu, logvar = out.chunk(2, dim=1)
        return mu, logvar

    def forward(self, x0: Tensor, t: Tensor | None = None) -> Tensor:
        return self.moments(x0, t)[0]


class FixedTimeEncoder(nn.Module):
    """A time-dependent encoder at one network time input: ``x0 -> E_phi(x0, t)`` (the linear probe's encoder)."""

    def __init__(self, encoder: nn.Module, t_input: float):
        super().__init__()
        self.encoder, self.t_input = encoder, float(t_input)
        self.code_dim = encoder.code_dim

    def forward(self, x0: Tensor) -> Tensor:
        return self.encoder(x0, torch.full((x0.shape[0],), self.t_input, device=x0.device))


def with_code(net: Callable[..., Tensor], z: Code | None) -> Callable[..., Tensor]:
    """``net`` with the code passed as its vector embedding (``emb``): z (B, d), or a function of the
    network's time input t -> z (a time-dependent code, computed at each call); None: ``net`` itself."""
    if z is None:
        return net

    def conditioned(x, t, y=None, **kwargs):
        return net(x, t, y, emb=z(t) if callable(z) else z, **kwargs)

    return conditioned


class _SampledCode:
    """The code of a training step as a function of the network's time input: E_phi(x0, t), or for a
    Gaussian encoder z = mu + sigma * noise with the noise drawn from the step's generator (after the
    base's own draws, so resuming a step redraws it exactly). Records the regulariser of the call."""

    def __init__(self, encoder: CodeHead, x0: Tensor, generator: torch.Generator | None):
        self.encoder, self.x0, self.generator = encoder, x0, generator
        self.penalty: Tensor | None = None

    def __call__(self, t: Tensor) -> Tensor:
        if self.penalty is not None:
            raise RuntimeError("the base objective called the network twice in one step; the representation "
                               "objective's code regulariser needs exactly one call")
        mu, logvar = self.encoder.moments(self.x0, t)
        if logvar is None:
            self.penalty = code_l1_penalty(mu.float())
            return mu
        device = self.generator.device if self.generator is not None else mu.device
        noise = torch.randn(mu.shape, generator=self.generator, device=device, dtype=mu.dtype).to(mu.device)
        self.penalty = gaussian_kl(mu.float(), logvar.float())
        return mu + torch.exp(0.5 * logvar) * noise  # the reparameterisation z = mu + sigma * noise


def _code_dim_of(net) -> int | None:
    config = getattr(net, "config", None)
    return None if config is None else int(getattr(config, "cond_embed_dim", 0) or 0)


class RepresentationObjective(nn.Module):
    """The base objective (a module with ``training_loss``) with the network conditioned on E_phi(x0).

    ``encoder`` is a submodule, so its parameters train with the network, live under
    ``objective.encoder.*`` in checkpoints and EMA, and are exported in objective.safetensors.
    """

    def __init__(self, base: nn.Module, encoder: nn.Module, lambda_z: float,
                 time_input: Callable[[Tensor], Tensor] | None = None):
        super().__init__()
        if not lambda_z >= 0:
            raise ValueError(f"lambda_z: {lambda_z!r} is not allowed; it must be >= 0")
        self.base, self.encoder, self.lambda_z = base, encoder, float(lambda_z)
        self.time_input = time_input  # diffusion time t in [0, 1] -> the network's time input (probing)

    @property
    def time_dependent(self) -> bool:
        return bool(getattr(self.encoder, "time_dependent", False))

    @property
    def schedule(self):
        return getattr(self.base, "schedule", None)

    @property
    def importance(self):  # Improved DDPM's importance sampler of the base, fed by the training loop
        return getattr(self.base, "importance", None)

    @property
    def num_timesteps(self) -> int:
        return self.base.num_timesteps

    def encode(self, x0: Tensor, t: Tensor | None = None) -> Tensor:
        """z = E_phi(x0), (B, d) (a Gaussian encoder's mean); a time-dependent one at the network time input t."""
        return self.encoder(x0, t) if self.time_dependent else self.encoder(x0)

    def encoder_at(self, t: float) -> nn.Module:
        """The encoder as a function of x0 alone: itself, or a time-dependent one at diffusion time t in [0, 1]."""
        if not self.time_dependent:
            return self.encoder
        if self.time_input is None:
            raise ValueError("encoder_at: this objective has no time_input (diffusion time -> network time input)")
        return FixedTimeEncoder(self.encoder, float(self.time_input(torch.tensor([float(t)]))[0]))

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
        if not isinstance(self.encoder, CodeHead):  # the deterministic, time-independent E_phi(x0)
            return self.loss_given_code(net, x0, y, self.encode(x0), generator=generator)
        code = _SampledCode(self.encoder, x0, generator)
        out = self.base.training_loss(with_code(net, code), x0, y, generator=generator)
        if code.penalty is None:
            raise RuntimeError("the base objective never called the network; the code was not used")
        return out._replace(loss=out.loss + self.lambda_z * code.penalty)

    forward = training_loss


class _Coded:
    """What a view of a representation model adds to its base view: ``encode`` and conditioning on
    codes (:meth:`with_code`, one per sample: the batch the sampler draws must have as many samples
    as z has rows) or on images (:meth:`with_images`)."""

    encoder: nn.Module | None
    time_dependent: bool

    def encode(self, x0: Tensor, t: Tensor | None = None) -> Tensor:
        """E_phi(x0) (a Gaussian encoder's mean); a time-dependent encoder needs the network's time input t."""
        if self.encoder is None:
            raise ValueError("encoder: this view has none (not a representation model)")
        if not self.time_dependent:
            return self.encoder(x0)
        if t is None:
            raise ValueError("t: a time-dependent encoder E_phi(x0, t) needs the network's time input")
        return self.encoder(x0, t)

    def with_images(self, x0: Tensor):
        """The view given images: the code E_phi(x0) computed once, or E_phi(x0, t) at each network call."""
        if self.time_dependent:
            return self.with_code(lambda t: self.encode(x0, t))
        return self.with_code(self.encode(x0))


@dataclass(frozen=True)
class CodeView(_Coded, DiscreteView):
    """A representation model as the discrete samplers see it: ``net`` at the unconditional code z = 0."""

    encoder: nn.Module | None = None
    time_dependent: bool = False

    def with_code(self, z: Code) -> DiscreteView:
        return DiscreteView(with_code(self.net, z), self.schedule, self.parameterization, self.variance)

    def with_net(self, net) -> CodeView:
        return dataclasses.replace(self, net=net)


@dataclass(frozen=True)
class SDECodeView(_Coded, SDEView):
    """A representation model on a score SDE as its samplers see it (``objective``: the base
    SDEObjective): ``net`` at the unconditional code z = 0."""

    encoder: nn.Module | None = None
    time_dependent: bool = False

    def with_code(self, z: Code) -> SDEView:
        return SDEView(with_code(self.net, z), self.objective, self.t_eps)
