"""Variational diffusion models (Kingma, Salimans, Poole & Ho, NeurIPS 2021).

z_t = alpha_t x + sigma_t eps with alpha_t^2 = sigmoid(-gamma(t)), sigma_t^2 = sigmoid(gamma(t)),
SNR(t) = exp(-gamma(t)); gamma is a learned monotone network (the paper's "monotonic
neural net", positive weights) or a fixed linear schedule. The VLB is

    -log p(x) <= KL(q(z_1 | x) || N(0, I))          prior term (loss_klz)
               + E[-log p(x | z_0)]                  reconstruction term (loss_recon)
               + L_diffusion                         diffusion term (loss_diff)

with the continuous-time diffusion term (eps form)
    L_inf = 1/2 E_{t~U(0,1)} gamma'(t) ||eps - eps^(z_t; t)||^2
or, for T steps (s_i = (i-1)/T, t_i = i/T), the discrete-time one
    L_T = T/2 E_i (exp(gamma(t_i) - gamma(s_i)) - 1) ||eps - eps^(z_{t_i}; t_i)||^2.
All terms are per example, in nats, summed over dimensions.

The learned schedule's endpoints gamma_0, gamma_1 are trained on the VLB; its interior, which
the continuous VLB does not depend on, is trained to minimise the variance of the per-example
loss (the paper's noise-schedule learning) by scaling the gradient that reaches it by
2 * loss (``schedule_objective='variance'``).

The network is called as ``model(z_in, t_input, y)`` and predicts eps; ``t_input`` is
1000 (gamma(t) - gamma_min) / (gamma_max - gamma_min) with the configured (initial) endpoints,
so it spans about [0, 1000] like a DDPM timestep. With Fourier features ``z_in`` is
concat(z, sin(2^n 2 pi z), cos(2^n 2 pi z)) along channels (in_channels = C (1 + 2 N)).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.diffusion.objectives import PerExampleObjective

from pipeline.diffusion.sde import make_noise_fn

__all__ = [
    "FixedLinearGamma",
    "MonotoneGamma",
    "VDMObjective",
    "VDMOutput",
    "fourier_features",
    "vdm_alpha_sigma",
    "gamma_and_derivative",
    "vdm_continuous_diffusion_loss",
    "vdm_discrete_diffusion_loss",
    "vdm_prior_loss",
    "vdm_reconstruction_loss",
    "vdm_sample",
]

EpsFn = Callable[[Tensor, Tensor], Tensor]  # eps_fn(z_t, gamma_t) -> eps^


def _col(v: Tensor, x: Tensor) -> Tensor:
    return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


def vdm_alpha_sigma(gamma: Tensor) -> tuple[Tensor, Tensor]:
    """alpha = sqrt(sigmoid(-gamma)), sigma = sqrt(sigmoid(gamma)) (variance preserving)."""
    return torch.sqrt(torch.sigmoid(-gamma)), torch.sqrt(torch.sigmoid(gamma))


# ---------------------------------------------------------------------------------------------
# Noise schedules gamma(t)


class FixedLinearGamma(nn.Module):
    """gamma(t) = gamma_min + (gamma_max - gamma_min) t (no parameters)."""

    def __init__(self, gamma_min: float = -13.3, gamma_max: float = 5.0) -> None:
        super().__init__()
        self.gamma_min, self.gamma_max = float(gamma_min), float(gamma_max)

    def forward(self, t: Tensor) -> Tensor:
        return self.gamma_min + (self.gamma_max - self.gamma_min) * t


class _PositiveLinear(nn.Module):
    """A dense layer whose weights are kept positive (softplus), so it is monotone increasing."""

    def __init__(self, fan_in: int, fan_out: int, init_scale: float = 1.0) -> None:
        super().__init__()
        # softplus(raw) starts near init_scale / fan_in so outputs keep a unit-ish scale
        target = init_scale / fan_in
        self.raw_weight = nn.Parameter(torch.full((fan_out, fan_in), math.log(math.expm1(target))))
        self.raw_weight.data.add_(0.1 * torch.randn(fan_out, fan_in))
        self.bias = nn.Parameter(torch.zeros(fan_out))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, F.softplus(self.raw_weight).to(x.dtype), self.bias.to(x.dtype))


class MonotoneGamma(nn.Module):
    """The paper's monotone network: gamma~(t) = l1(t) + l3(sigmoid(l2(l1(t)))), positive weights,
    rescaled so gamma(0) = gamma_0 and gamma(1) = gamma_1 (both learned)."""

    def __init__(self, gamma_min: float = -13.3, gamma_max: float = 5.0, hidden: int = 1024) -> None:
        super().__init__()
        if not gamma_min < gamma_max or hidden < 1:
            raise ValueError(f"gamma_min/gamma_max/hidden: ({gamma_min}, {gamma_max}, {hidden}) not allowed")
        self.l1 = _PositiveLinear(1, 1)
        self.l2 = _PositiveLinear(1, hidden, init_scale=6.0)
        self.l3 = _PositiveLinear(hidden, 1)
        # Shape (1,), not 0-d: DeepSpeed cannot broadcast or partition 0-d parameters.
        self.gamma_0 = nn.Parameter(torch.tensor([float(gamma_min)]))
        self.gamma_1 = nn.Parameter(torch.tensor([float(gamma_max)]))

    def gamma_tilde(self, t: Tensor) -> Tensor:
        h = self.l1(t.reshape(-1, 1))
        return (h + self.l3(torch.sigmoid(self.l2(h) - 3.0))).reshape(t.shape)

    def interior(self, t: Tensor, *, derivative: bool = False) -> tuple[Tensor, Tensor | None]:
        """The shape frac(t) = (gamma~(t) - gamma~(0)) / (gamma~(1) - gamma~(0)) in [0, 1], and frac'(t)."""
        with torch.enable_grad() if derivative else contextlib.nullcontext():
            if derivative:
                t = t.detach().requires_grad_(True)
            ends = self.gamma_tilde(torch.tensor([0.0, 1.0], dtype=t.dtype, device=t.device))
            frac = (self.gamma_tilde(t) - ends[0]) / (ends[1] - ends[0])
            dfrac = torch.autograd.grad(frac.sum(), t, create_graph=True)[0] if derivative else None
        return frac, dfrac

    def ends(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        return self.gamma_0.to(dtype).squeeze(0), self.gamma_1.to(dtype).squeeze(0)

    def forward(self, t: Tensor) -> Tensor:
        g0, g1 = self.ends(t.dtype)
        return g0 + (g1 - g0) * self.interior(t)[0]


def gamma_and_derivative(gamma_fn: nn.Module, t: Tensor) -> tuple[Tensor, Tensor]:
    """gamma(t) and gamma'(t) by autograd; the graph stays so gamma's parameters get gradients."""
    with torch.enable_grad():
        t = t.detach().requires_grad_(True)
        g = gamma_fn(t)
        (dg,) = torch.autograd.grad(g.sum(), t, create_graph=True)
    return g, dg


# ---------------------------------------------------------------------------------------------
# The VLB terms


def fourier_features(z: Tensor, exponents: tuple[int, int] = (7, 8)) -> Tensor:
    """sin/cos(2^n 2 pi z) for n in range(*exponents), stacked on dim 1 (the paper's Fourier features)."""
    n_min, n_max = exponents
    if not n_min < n_max:
        raise ValueError(f"fourier_exponents: {exponents} not allowed; need n_min < n_max")
    freqs = (2.0 ** torch.arange(n_min, n_max, dtype=z.dtype, device=z.device)) * 2 * math.pi
    h = (z.unsqueeze(2) * freqs.reshape((1, 1, -1) + (1,) * (z.ndim - 2))).flatten(1, 2)  # (B, C N, ...)
    return torch.cat([torch.sin(h), torch.cos(h)], dim=1)


def _sum_dims(v: Tensor) -> Tensor:
    return v.reshape(v.shape[0], -1).sum(-1)


def vdm_prior_loss(x: Tensor, gamma_1: Tensor) -> Tensor:
    """KL(q(z_1 | x) || N(0, I)) = 1/2 sum(sigma_1^2 + alpha_1^2 x^2 - 1 - log sigma_1^2), per example."""
    alpha2, sigma2 = torch.sigmoid(-gamma_1), torch.sigmoid(gamma_1)
    return 0.5 * _sum_dims(sigma2 + alpha2 * x**2 - 1 - F.logsigmoid(gamma_1).expand_as(x))


def vdm_reconstruction_loss(x: Tensor, gamma_0: Tensor, *, num_bins: int = 256, generator=None) -> Tensor:
    """-log p(x | z_0) for data on the grid k / (num_bins - 1) * 2 - 1, factorised over dims:
    p(x_i = v_k | z_0) = softmax_k(-(z_0,i / alpha_0 - v_k)^2 / (2 exp(gamma_0)))."""
    alpha0, sigma0 = vdm_alpha_sigma(gamma_0)
    eps = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    z0_rescaled = x + sigma0 / alpha0 * eps  # z_0 / alpha_0
    values = torch.linspace(-1.0, 1.0, num_bins, dtype=x.dtype, device=x.device)
    logits = -0.5 * (z0_rescaled.unsqueeze(-1) - values) ** 2 / torch.exp(gamma_0)
    k = torch.round((x + 1) * (num_bins - 1) / 2).clamp(0, num_bins - 1).long()
    log_probs = torch.log_softmax(logits, dim=-1).gather(-1, k.unsqueeze(-1)).squeeze(-1)
    return -_sum_dims(log_probs)


def _noise(x: Tensor, noise: Tensor | None, generator) -> Tensor:
    if noise is None:
        return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    if noise.shape != x.shape:
        raise ValueError(f"noise: shape {tuple(noise.shape)} is not allowed; expected {tuple(x.shape)}")
    return noise


def vdm_continuous_diffusion_loss(
    eps_fn: EpsFn, x: Tensor, g: Tensor, dg: Tensor, *, noise: Tensor | None = None, generator=None
) -> Tensor:
    """L_inf estimate 1/2 gamma'(t) ||eps - eps^(z_t; t)||^2 from g = gamma(t), dg = gamma'(t)."""
    alpha, sigma = vdm_alpha_sigma(g)
    eps = _noise(x, noise, generator)
    z = _col(alpha, x) * x + _col(sigma, x) * eps
    return 0.5 * dg * _sum_dims((eps - eps_fn(z, g)) ** 2)


def vdm_discrete_diffusion_loss(
    eps_fn: EpsFn, x: Tensor, g_t: Tensor, g_s: Tensor, timesteps: int, *, noise: Tensor | None = None, generator=None
) -> Tensor:
    """L_T estimate T/2 (exp(gamma(t) - gamma(s)) - 1) ||eps - eps^(z_t; t)||^2 from g_t = gamma(i/T),
    g_s = gamma((i-1)/T): SNR(s)/SNR(t) - 1 = exp(g_t - g_s) - 1."""
    alpha, sigma = vdm_alpha_sigma(g_t)
    eps = _noise(x, noise, generator)
    z = _col(alpha, x) * x + _col(sigma, x) * eps
    return 0.5 * timesteps * torch.expm1(g_t - g_s) * _sum_dims((eps - eps_fn(z, g_t)) ** 2)


@dataclass(frozen=True)
class VDMOutput:
    """The three VLB terms per example, in nats summed over dimensions."""

    loss_recon: Tensor
    loss_klz: Tensor
    loss_diff: Tensor
    num_dims: int

    @property
    def loss(self) -> Tensor:
        return self.loss_recon + self.loss_klz + self.loss_diff

    @property
    def bpd(self) -> Tensor:
        """The VLB in bits per dimension (a bound on the discrete data's codelength)."""
        return self.loss / (self.num_dims * math.log(2))


class VDMObjective(PerExampleObjective, nn.Module):
    """VDM's VLB as a training objective ``loss(model, x0, y=None, *, generator) -> bpd (B,)``.

    Holds the noise schedule gamma as a submodule: optimise ``objective.parameters()`` together
    with the model's. ``timesteps=0`` gives the continuous-time loss, T > 0 the discrete-time one.
    """

    def __init__(
        self,
        schedule: str = "learned",
        gamma_min: float = -13.3,
        gamma_max: float = 5.0,
        timesteps: int = 0,
        num_bins: int = 256,
        fourier_features: bool = False,
        fourier_exponents: tuple[int, int] = (7, 8),
        antithetic: bool = True,
        hidden: int = 1024,
        schedule_objective: str = "variance",
    ) -> None:
        super().__init__()
        if schedule == "learned":
            self.gamma = MonotoneGamma(gamma_min, gamma_max, int(hidden))
        elif schedule == "fixed_linear":
            self.gamma = FixedLinearGamma(gamma_min, gamma_max)
        else:
            raise ValueError(f"schedule: {schedule!r} is not allowed; expected 'learned' or 'fixed_linear'")
        if int(timesteps) < 0 or int(num_bins) < 2:
            raise ValueError(f"timesteps/num_bins: ({timesteps}, {num_bins}) not allowed; need >= 0 and >= 2")
        self.gamma_min, self.gamma_max = float(gamma_min), float(gamma_max)
        self.timesteps, self.num_bins = int(timesteps), int(num_bins)
        self.use_fourier, self.fourier_exponents = bool(fourier_features), tuple(fourier_exponents)
        self.antithetic = bool(antithetic)
        if schedule_objective not in ("variance", "vlb"):
            raise ValueError(f"schedule_objective: {schedule_objective!r} is not allowed; expected 'variance' or 'vlb'")
        self.schedule_objective = schedule_objective

    def noise_input(self, gamma: Tensor) -> Tensor:
        """What the network is conditioned on: gamma rescaled to about [0, 1000]."""
        return 1000.0 * (gamma - self.gamma_min) / (self.gamma_max - self.gamma_min)

    def eps_fn(self, model, y: Tensor | None = None) -> EpsFn:
        """Adapt ``model(z_in, t_input, y)`` to ``eps_fn(z_t, gamma_t)``."""

        def eps_fn(z: Tensor, gamma: Tensor) -> Tensor:
            z_in = torch.cat([z, fourier_features(z, self.fourier_exponents)], 1) if self.use_fourier else z
            return model(z_in, self.noise_input(gamma), y)

        return eps_fn

    def sample_times(self, b: int, *, dtype=torch.float32, device=None, generator=None) -> Tensor:
        """t ~ U(0, 1), or the low-discrepancy (u0 + i / B) mod 1 of the paper when antithetic."""
        if self.antithetic:
            u0 = torch.rand((), generator=generator, dtype=dtype, device=device)
            return torch.remainder(u0 + torch.arange(b, dtype=dtype, device=device) / b, 1.0)
        return torch.rand(b, generator=generator, dtype=dtype, device=device)

    def _schedule(self, t: Tensor, derivative: bool) -> tuple[Tensor, Tensor | None, list[Tensor]]:
        """gamma(t), gamma'(t) (if asked) and the tensors through which only the schedule's interior acts."""
        if not isinstance(self.gamma, MonotoneGamma):
            if derivative:
                return (*gamma_and_derivative(self.gamma, t), [])
            return self.gamma(t), None, []
        g0, g1 = self.gamma.ends(t.dtype)
        frac, dfrac = self.gamma.interior(t, derivative=derivative)
        return g0 + (g1 - g0) * frac, None if dfrac is None else (g1 - g0) * dfrac, [frac, dfrac]

    def terms(self, model, x0: Tensor, y: Tensor | None = None, *, generator=None) -> VDMOutput:
        """The three VLB terms. With the learned schedule and ``schedule_objective='variance'`` the
        gradient reaching the schedule's interior is that of E[loss^2] instead of E[loss] (
        the VLB does not depend on the interior, only its variance does; the endpoints follow the VLB)."""
        b = x0.shape[0]
        eps_fn = self.eps_fn(model, y)
        t = self.sample_times(b, dtype=x0.dtype, device=x0.device, generator=generator)
        if self.timesteps == 0:
            g, dg, interior = self._schedule(t, derivative=True)
            loss_diff = vdm_continuous_diffusion_loss(eps_fn, x0, g, dg, generator=generator)
        else:
            i = (torch.floor(t * self.timesteps) + 1).clamp(max=self.timesteps)
            g, _, interior = self._schedule(i / self.timesteps, derivative=False)
            g_s, _, interior_s = self._schedule((i - 1) / self.timesteps, derivative=False)
            interior = interior + interior_s
            loss_diff = vdm_discrete_diffusion_loss(eps_fn, x0, g, g_s, self.timesteps, generator=generator)
        ends, _, _ = self._schedule(torch.tensor([0.0, 1.0], dtype=x0.dtype, device=x0.device), derivative=False)
        loss_klz = vdm_prior_loss(x0, ends[1])
        loss_recon = vdm_reconstruction_loss(x0, ends[0], num_bins=self.num_bins, generator=generator)
        out = VDMOutput(loss_recon, loss_klz, loss_diff, x0[0].numel())
        if self.schedule_objective == "variance" and torch.is_grad_enabled():
            scale = 2 * out.bpd.detach()  # d E[l^2] / d eta = E[2 l dl / d eta], l the per-example loss
            for v in interior:
                if v is not None and v.requires_grad:
                    v.register_hook(lambda grad, scale=scale: grad * scale.to(grad.dtype))
        return out

    def forward(self, model, x0: Tensor, y: Tensor | None = None, *, generator=None) -> Tensor:
        return self.terms(model, x0, y, generator=generator).bpd


def vdm_sample(
    eps_fn: EpsFn, gamma_fn: nn.Module, x_init: Tensor, *, steps: int = 1000, seeds=None, generator=None
) -> Tensor:
    """Ancestral sampling z_s ~ p(z_s | z_t) on t_i = i / steps, then x^ = z_0 / alpha_0:
    z_s = alpha_s / alpha_t (z_t - sigma_t c eps^) + sqrt(c) sigma_s z, c = -expm1(gamma_s - gamma_t)."""
    noise_fn = make_noise_fn(seeds=seeds, generator=generator)
    z = x_init
    b = z.shape[0]
    for i in range(steps, 0, -1):
        t = torch.full((b,), i / steps, dtype=z.dtype, device=z.device)
        s = t - 1.0 / steps
        with torch.no_grad():
            g_t, g_s = gamma_fn(t), gamma_fn(s)
        c = -torch.expm1(g_s - g_t)
        (a_t, s_t), (a_s, s_s) = vdm_alpha_sigma(g_t), vdm_alpha_sigma(g_s)
        eps_hat = eps_fn(z, g_t)
        z = _col(a_s / a_t, z) * (z - _col(s_t * c, z) * eps_hat)
        if i > 1:
            z = z + _col(torch.sqrt(c) * s_s, z) * noise_fn(z, i)
    with torch.no_grad():
        g0 = gamma_fn(torch.zeros(b, dtype=z.dtype, device=z.device))
    return z / _col(vdm_alpha_sigma(g0)[0], z)
