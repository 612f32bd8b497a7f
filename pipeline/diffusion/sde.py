"""Score-based generative modelling through SDEs (Song et al., ICLR 2021).

The forward SDE dx = f(x, t) dt + g(t) dw on t in [0, 1] has Gaussian transition kernels
x_t | x_0 ~ N(alpha(t) x_0, sigma(t)^2 I), so everything below is written in terms of
``(alpha, sigma) = sde.marginal(t)``:

- VP  (eq. 11): dx = -1/2 beta(t) x dt + sqrt(beta(t)) dw,  alpha = exp(-1/2 int beta), sigma^2 = 1 - alpha^2.
- sub-VP (Sec. 3.4): same drift, g^2 = beta(t) (1 - exp(-2 int beta)),  sigma = 1 - alpha^2.
- VE  (eq. 9): dx = sqrt(d sigma^2/dt) dw, sigma(t) = sigma_min (sigma_max / sigma_min)^t, alpha = 1.

The model interface is one score function ``score_fn(x, t) -> grad_x log p_t(x)`` with t of shape
(B,). :func:`score_fn_from_model` adapts a network ``model(x, t_input, y)`` once: the network
sees ``sde.noise_input(t)`` (VP and sub-VP: ``999 t``, the DDPM timestep range; VE: ``log sigma(t)``)
and predicts eps by default (score = -eps / sigma), or x0, v or the score itself.

Samplers (all pure functions over ``score_fn``): :func:`pc_sample` (reverse-diffusion or
Euler-Maruyama predictor, Langevin corrector with a signal-to-noise ratio; optional inpainting),
:func:`ode_sample` (probability-flow ODE with torchdiffeq's adaptive solvers, or fixed-step Heun).
Likelihood: :func:`ode_likelihood` (instantaneous change of variables; Hutchinson-Rademacher or
exact divergence), :func:`bits_per_dim`, :func:`uniform_dequantize`.
Training: :class:`SDEObjective` (denoising score matching, eq. 7, with lambda = sigma^2 or the
likelihood weighting lambda = g^2); the registry (``pipeline.diffusion.registry``) builds it from options.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from pipeline.diffusion.objectives import PerExampleObjective

from pipeline.diffusion.gaussian import x0_eps_from_output
from pipeline.diffusion.samplers import noise_from_seeds

__all__ = [
    "SDE",
    "LikelihoodResult",
    "NoiseFn",
    "ScoreFn",
    "SDEObjective",
    "SubVPSDE",
    "VESDE",
    "VPSDE",
    "bits_per_dim",
    "dsm_loss",
    "euler_maruyama_predictor",
    "langevin_corrector",
    "make_noise_fn",
    "make_sde",
    "ode_likelihood",
    "ode_sample",
    "pc_sample",
    "prediction_to_eps",
    "prediction_to_score",
    "prediction_to_x0",
    "prediction_to_x0_eps",
    "probability_flow_drift",
    "reverse_diffusion_predictor",
    "score_fn_from_model",
    "uniform_dequantize",
]

ScoreFn = Callable[[Tensor, Tensor], Tensor]
PARAMETERIZATIONS = ("eps", "x0", "v", "score")


def append_dims(v: Tensor, ndim: int) -> Tensor:
    """Reshape a per-example (B,) tensor to broadcast against a (B, ...) tensor of ``ndim`` dims."""
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def _check_parameterization(parameterization: str) -> None:
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(f"parameterization: {parameterization!r} is not allowed; expected one of {PARAMETERIZATIONS}")


# ---------------------------------------------------------------------------------------------
# Parameterisations: one conversion each, for x_t = alpha x0 + sigma eps


def prediction_to_x0_eps(
    out: Tensor, x: Tensor, alpha: Tensor, sigma: Tensor, parameterization: str
) -> tuple[Tensor, Tensor]:
    """(E[x0 | x_t], E[eps | x_t]) from a network output; alpha, sigma per example (B,).

    'eps', 'x0', 'v' go through the discrete core's conversion ('v' needs alpha^2 + sigma^2 = 1);
    'score' uses Tweedie: E[eps | x_t] = -sigma grad log p_t(x_t).
    """
    _check_parameterization(parameterization)
    a, s = append_dims(alpha, x.ndim), append_dims(sigma, x.ndim)
    if parameterization == "score":
        eps = -s * out
        return (x - s * eps) / a, eps
    return x0_eps_from_output(out, x, a, s, parameterization)


def prediction_to_x0(out: Tensor, x: Tensor, alpha: Tensor, sigma: Tensor, parameterization: str) -> Tensor:
    return prediction_to_x0_eps(out, x, alpha, sigma, parameterization)[0]


def prediction_to_eps(out: Tensor, x: Tensor, alpha: Tensor, sigma: Tensor, parameterization: str) -> Tensor:
    return prediction_to_x0_eps(out, x, alpha, sigma, parameterization)[1]


def prediction_to_score(out: Tensor, x: Tensor, alpha: Tensor, sigma: Tensor, parameterization: str) -> Tensor:
    """grad_x log p_t(x) from a network output."""
    if parameterization == "score":
        return out
    return -prediction_to_eps(out, x, alpha, sigma, parameterization) / append_dims(sigma, x.ndim)


# ---------------------------------------------------------------------------------------------
# The three SDEs


class SDE:
    """A linear forward SDE on t in [0, 1]; subclasses define the coefficients."""

    name = "sde"
    prior_std = 1.0  # the prior is N(0, prior_std^2 I)

    def marginal(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(alpha(t), sigma(t)) of the transition kernel x_t | x_0 ~ N(alpha x_0, sigma^2 I)."""
        raise NotImplementedError

    def coefficients(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(a(t), g(t)) with drift f(x, t) = a(t) x: the SDEs here are all linear in x."""
        raise NotImplementedError

    def sde(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Drift f(x, t) (shape of x) and diffusion g(t) (shape (B,))."""
        a, g = self.coefficients(t)
        return append_dims(a, x.ndim) * x, g

    def discretize(self, x: Tensor, t: Tensor, dt: float) -> tuple[Tensor, Tensor]:
        """(f_i, G_i) of x_t = x_{t-dt} + f_i + G_i z: Euler-Maruyama by default (App. E)."""
        drift, g = self.sde(x, t)
        return drift * dt, g * math.sqrt(dt)

    def corrector_alpha(self, t: Tensor, dt: float) -> Tensor:
        """alpha_i of the Langevin corrector (Algorithms 4-5): 1 except for VP."""
        return torch.ones_like(t)

    def prior_sample(self, shape, *, generator=None, dtype=torch.float32, device=None) -> Tensor:
        return torch.randn(shape, generator=generator, dtype=dtype, device=device) * self.prior_std

    def prior_log_prob(self, z: Tensor) -> Tensor:
        """log N(z; 0, prior_std^2 I), per example."""
        d = z[0].numel()
        sq = z.reshape(z.shape[0], -1).pow(2).sum(-1) / self.prior_std**2
        return -0.5 * (sq + d * math.log(2 * math.pi * self.prior_std**2))

    def noise_input(self, t: Tensor) -> Tensor:
        """What a network ``model(x, t_input, y)`` is conditioned on."""
        raise NotImplementedError

    def t_from_ratio(self, ratio: Tensor) -> Tensor:
        """The time at which sigma(t) / alpha(t) equals ``ratio`` (the EDM noise level)."""
        raise NotImplementedError


@dataclass(frozen=True)
class VPSDE(SDE):
    """Variance-preserving SDE, the continuous DDPM (eq. 11; beta_min 0.1, beta_max 20)."""

    beta_min: float = 0.1
    beta_max: float = 20.0
    name = "vp"

    def __post_init__(self) -> None:
        if not 0 <= self.beta_min < self.beta_max:
            raise ValueError(f"beta_min/beta_max: ({self.beta_min}, {self.beta_max}) not allowed; need 0 <= min < max")

    def beta(self, t: Tensor) -> Tensor:
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def beta_integral(self, t: Tensor) -> Tensor:
        """int_0^t beta(s) ds."""
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2

    def marginal(self, t):
        b = self.beta_integral(t)
        return torch.exp(-0.5 * b), torch.sqrt(-torch.expm1(-b))  # perturbation kernel of the VP SDE (App. B)

    def coefficients(self, t):
        beta = self.beta(t)
        return -0.5 * beta, torch.sqrt(beta)

    def discretize(self, x, t, dt):
        # The exact DDPM step t-dt -> t: beta_i = 1 - alpha(t)^2 / alpha(t-dt)^2 (App. E, with exact beta_i).
        beta_i = self._beta_i(t, dt)
        return append_dims(torch.sqrt(1 - beta_i) - 1, x.ndim) * x, torch.sqrt(beta_i)

    def _beta_i(self, t: Tensor, dt: float) -> Tensor:
        return -torch.expm1(-(self.beta_integral(t) - self.beta_integral(t - dt)))

    def corrector_alpha(self, t, dt):
        return 1 - self._beta_i(t, dt)  # alpha_i = 1 - beta_i (Algorithm 5)

    def noise_input(self, t):
        return 999.0 * t  # the DDPM timestep range, as in DDPM++

    def t_from_ratio(self, ratio):
        big_b = torch.log1p(ratio**2)  # 1 / alpha^2 = 1 + ratio^2
        db = self.beta_max - self.beta_min
        return (torch.sqrt(self.beta_min**2 + 2 * db * big_b) - self.beta_min) / db


@dataclass(frozen=True)
class SubVPSDE(VPSDE):
    """sub-VP SDE (Sec. 3.4): the VP drift with a smaller diffusion; marginal std 1 - alpha^2."""

    name = "subvp"

    def marginal(self, t):
        b = self.beta_integral(t)
        return torch.exp(-0.5 * b), -torch.expm1(-b)  # perturbation kernel of the sub-VP SDE (App. B)

    def coefficients(self, t):
        beta = self.beta(t)
        return -0.5 * beta, torch.sqrt(beta * -torch.expm1(-2 * self.beta_integral(t)))

    def discretize(self, x, t, dt):
        return SDE.discretize(self, x, t, dt)

    def corrector_alpha(self, t, dt):
        return torch.ones_like(t)

    def t_from_ratio(self, ratio):
        alpha = (torch.sqrt(ratio**2 + 4) - ratio) / 2  # (1 - a^2) / a = ratio
        return super().t_from_ratio(torch.sqrt(alpha ** (-2) - 1))


@dataclass(frozen=True)
class VESDE(SDE):
    """Variance-exploding SDE, the continuous NCSN (eq. 9; sigma_min 0.01, sigma_max per dataset)."""

    sigma_min: float = 0.01
    sigma_max: float = 50.0
    name = "ve"

    def __post_init__(self) -> None:
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(
                f"sigma_min/sigma_max: ({self.sigma_min}, {self.sigma_max}) not allowed; need 0 < min < max"
            )

    @property
    def prior_std(self) -> float:  # type: ignore[override]
        return self.sigma_max

    def sigma(self, t: Tensor) -> Tensor:
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** t

    def marginal(self, t):
        return torch.ones_like(t), self.sigma(t)

    def coefficients(self, t):
        return torch.zeros_like(t), self.sigma(t) * math.sqrt(2 * math.log(self.sigma_max / self.sigma_min))

    def discretize(self, x, t, dt):
        # NCSN's Markov chain: G_i = sqrt(sigma_i^2 - sigma_{i-1}^2) (App. E).
        g = torch.sqrt(self.sigma(t) ** 2 - self.sigma(t - dt) ** 2)
        return torch.zeros_like(x), g

    def noise_input(self, t):
        return torch.log(self.sigma(t))  # NCSN++ conditions on log sigma

    def t_from_ratio(self, ratio):
        return torch.log(ratio / self.sigma_min) / math.log(self.sigma_max / self.sigma_min)


def make_sde(name: str, **kwargs: Any) -> SDE:
    """'vp', 'subvp' or 've' with their keyword parameters."""
    table = {"vp": VPSDE, "subvp": SubVPSDE, "ve": VESDE}
    if name not in table:
        raise ValueError(f"sde: {name!r} is not allowed; expected one of {sorted(table)}")
    return table[name](**kwargs)


# ---------------------------------------------------------------------------------------------
# The model adapter (written once)


def score_fn_from_model(
    model: Callable[..., Tensor], sde: SDE, parameterization: str = "eps", y: Tensor | None = None
) -> ScoreFn:
    """Adapt ``model(x, sde.noise_input(t), y)`` predicting eps/x0/v/score to ``score_fn(x, t)``."""
    _check_parameterization(parameterization)

    def score_fn(x: Tensor, t: Tensor) -> Tensor:
        alpha, sigma = sde.marginal(t)
        out = model(x, sde.noise_input(t), y)
        return prediction_to_score(out, x, alpha, sigma, parameterization)

    return score_fn


# ---------------------------------------------------------------------------------------------
# Predictor-corrector sampling (Algorithms 1, 4-5)


def _randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)


NoiseFn = Callable[[Tensor, int], Tensor]


def make_noise_fn(*, seeds: Sequence[int] | Tensor | None = None, generator: torch.Generator | None = None) -> NoiseFn:
    """``noise(x, key)``: standard normal noise shaped like x for the stream ``key``.

    With ``seeds`` (one per sample) it comes from ``noise_from_seeds``: a sample's noise depends
    only on its seed and the key, so a sample does not depend on the batch it was drawn in.
    Otherwise it is drawn from ``generator`` (or the global generator).
    """
    if seeds is None:
        return lambda x, key: _randn_like(x, generator)
    seeds = torch.as_tensor(seeds, dtype=torch.int64)
    return lambda x, key: noise_from_seeds(seeds, x.shape[1:], key, dtype=x.dtype, device=x.device)


def reverse_diffusion_predictor(score_fn: ScoreFn, sde: SDE, x: Tensor, t: Tensor, dt: float, noise: Tensor):
    """x_{i-1} = x_i - f_i + G_i^2 s(x_i, t_i) + G_i z (reverse diffusion, App. E). Returns (x, noise-free mean)."""
    f, g = sde.discretize(x, t, dt)
    g = append_dims(g, x.ndim)
    x_mean = x - f + g**2 * score_fn(x, t)
    return x_mean + g * noise, x_mean


def euler_maruyama_predictor(score_fn: ScoreFn, sde: SDE, x: Tensor, t: Tensor, dt: float, noise: Tensor):
    """One Euler-Maruyama step of the reverse SDE (eq. 6) from t to t - dt. Returns (x, mean)."""
    drift, g = sde.sde(x, t)
    g = append_dims(g, x.ndim)
    x_mean = x - (drift - g**2 * score_fn(x, t)) * dt
    return x_mean + g * math.sqrt(dt) * noise, x_mean


def langevin_corrector(
    score_fn: ScoreFn,
    sde: SDE,
    x: Tensor,
    t: Tensor,
    dt: float,
    noise: Tensor,
    *,
    snr: float,
    norm: str = "batch",
    free: Tensor | None = None,
):
    """One Langevin MCMC step with step size 2 alpha_i (r ||z|| / ||s||)^2 (Algorithms 4-5). Returns (x, mean).

    ``norm`` says whose norms enter the step:
    'batch': the batch means of the per-example norms (score_sde's reference code); a sample then
    depends on its batch.
    'example': each example's own norms (Algorithm 4 literally). Batch-independent and close to
    'batch' for images, but in low dimension ||s|| of one example can vanish near a mode and its
    step explode (the 2-D Gaussian-mixture oracle over-disperses ~5x in variance).
    'noise_level': the norms that pure noise at the current level has, ||z||^2 = D and
    ||s||^2 = D / sigma_t^2 (the score of N(alpha x0, sigma_t^2 I)), so the step is
    2 alpha_i (r sigma_t)^2 for every example: batch-independent and stable in any dimension
    (grad^2 log p_t >= -I / sigma_t^2, so the step is far below the 2 sigma_t^2 Langevin limit).
    Equal to 'batch' for images at high noise; at low noise 'batch' steps are larger, by
    D / E||E[z | x_t]||^2 (how much of the noise the denoiser can still tell apart).
    ``free`` (boolean, like x): only these coordinates move and enter the norms (inpainting).
    """
    if norm not in ("batch", "example", "noise_level"):
        raise ValueError(f"norm: {norm!r} is not allowed; expected 'batch', 'example' or 'noise_level'")
    alpha = sde.corrector_alpha(t, dt)
    grad, z = score_fn(x, t), noise
    if free is not None:
        grad, z = grad * free, z * free
    if norm == "noise_level":
        step = append_dims(2 * alpha * (snr * sde.marginal(t)[1]) ** 2, x.ndim)
    else:
        grad_norm = grad.reshape(x.shape[0], -1).norm(dim=-1)
        z_norm = z.reshape(x.shape[0], -1).norm(dim=-1)
        if norm == "batch":
            grad_norm, z_norm = grad_norm.mean().expand_as(grad_norm), z_norm.mean().expand_as(z_norm)
        step = append_dims(2 * alpha * (snr * z_norm / grad_norm.clamp_min(1e-20)) ** 2, x.ndim)
    x_mean = x + step * grad
    return x_mean + torch.sqrt(2 * step) * z, x_mean


_PREDICTORS = {"reverse_diffusion": reverse_diffusion_predictor, "euler_maruyama": euler_maruyama_predictor}
# noise stream keys of pc_sample: predictor step i -> 1 + i; corrector (i, j) -> _CORR + j 2^20 + i;
# inpainting replacement after the corrector / predictor of step i -> _REPL + 2 i (+ 1)
_CORR, _REPL = 1 << 40, 2 << 40


def _replace_known(x: Tensor, known: Tensor | None, mask: Tensor | None, sde: SDE, t: Tensor | None, noise_fn, key):
    """Overwrite the known coordinates with a forward sample of them at time t (t=None: exactly)."""
    if known is None:
        return x
    if t is None:
        noisy = known
    else:
        alpha, sigma = sde.marginal(t)
        noisy = append_dims(alpha, x.ndim) * known + append_dims(sigma, x.ndim) * noise_fn(x, key)
    return torch.where(mask, noisy, x)


def pc_sample(
    score_fn: ScoreFn,
    sde: SDE,
    x_init: Tensor,
    *,
    steps: int = 1000,
    predictor: str | None = "reverse_diffusion",
    corrector: str | None = "langevin",
    snr: float = 0.16,
    corrector_steps: int = 1,
    snr_norm: str = "batch",
    eps: float = 1e-3,
    denoise: bool = True,
    known: Tensor | None = None,
    mask: Tensor | None = None,
    seeds: Sequence[int] | Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Predictor-corrector sampling (Algorithm 1) from ``x_init`` ~ the prior, t from 1 to ``eps``.

    ``x_init`` is a prior draw (``sde.prior_sample``). Inpainting: ``known`` data and a boolean
    ``mask`` (True where known); after every step the known coordinates are replaced by a fresh
    forward sample at the current time, and by the data itself at the end; the corrector then
    moves (and measures norms over) the unknown coordinates only.
    With ``denoise`` the last predictor step returns its noise-free mean. Noise: per-sample
    ``seeds`` (with ``snr_norm`` 'example' or 'noise_level' a sample is then independent of its batch) or
    ``generator``. ``snr_norm``: see :func:`langevin_corrector`.
    """
    if predictor is not None and predictor not in _PREDICTORS:
        raise ValueError(f"predictor: {predictor!r} is not allowed; expected one of {sorted(_PREDICTORS)} or None")
    if corrector not in (None, "langevin"):
        raise ValueError(f"corrector: {corrector!r} is not allowed; expected 'langevin' or None")
    if steps < 1 or corrector_steps < 1:
        raise ValueError(f"steps/corrector_steps: ({steps}, {corrector_steps}) not allowed; expected >= 1")
    if (known is None) != (mask is None):
        raise ValueError("known/mask: give both for inpainting, or neither")
    if mask is not None:
        mask = mask.to(torch.bool).expand_as(x_init)
    noise_fn = make_noise_fn(seeds=seeds, generator=generator)
    ts = torch.linspace(1.0, eps, steps + 1, dtype=torch.float64)
    ones = torch.ones(x_init.shape[0], dtype=x_init.dtype, device=x_init.device)
    x = _replace_known(x_init, known, mask, sde, ones, noise_fn, _REPL - 1)
    x_mean = x
    for i in range(steps):
        t = torch.full((x.shape[0],), float(ts[i]), dtype=x.dtype, device=x.device)
        t_next = torch.full_like(t, float(ts[i + 1]))
        dt = float(ts[i] - ts[i + 1])
        if corrector is not None:
            for j in range(corrector_steps):
                x, x_mean = langevin_corrector(
                    score_fn, sde, x, t, dt, noise_fn(x, _CORR + (j << 20) + i), snr=snr, norm=snr_norm,
                    free=None if mask is None else ~mask,
                )
            x = _replace_known(x, known, mask, sde, t, noise_fn, _REPL + 2 * i)
        if predictor is not None:
            x, x_mean = _PREDICTORS[predictor](score_fn, sde, x, t, dt, noise_fn(x, 1 + i))
            x = _replace_known(x, known, mask, sde, t_next, noise_fn, _REPL + 2 * i + 1)
    out = x_mean if denoise else x
    return _replace_known(out, known, mask, sde, None, noise_fn, 0)


# ---------------------------------------------------------------------------------------------
# Probability-flow ODE (eq. 13) and likelihood (App. D.2)


def probability_flow_drift(score_fn: ScoreFn, sde: SDE, x: Tensor, t: Tensor) -> Tensor:
    """dx/dt = f(x, t) - 1/2 g(t)^2 grad log p_t(x) (eq. 13)."""
    drift, g = sde.sde(x, t)
    return drift - 0.5 * append_dims(g, x.ndim) ** 2 * score_fn(x, t)


def _odeint(func, y0, t0: float, t1: float, *, method: str, rtol: float, atol: float, steps: int):
    """Integrate dy/dt = func(t, y) from t0 to t1; 'heun' is fixed-step, others go to torchdiffeq."""
    if method == "heun":  # Heun's second-order method on a uniform grid
        ts = torch.linspace(t0, t1, steps + 1, dtype=torch.float64)
        y = y0
        for i in range(steps):
            h = float(ts[i + 1] - ts[i])
            d1 = func(ts[i], y)
            y_euler = tuple(a + h * b for a, b in zip(y, d1))
            d2 = func(ts[i + 1], y_euler)
            y = tuple(a + 0.5 * h * (b + c) for a, b, c in zip(y, d1, d2))
        return y
    import torchdiffeq  # an established adaptive solver (dopri5 by default)

    lo, hi = min(t0, t1), max(t0, t1)

    def clamped(t, y):  # the initial-step heuristic may probe just outside [t0, t1]
        return func(t.clamp(lo, hi), y)

    tt = torch.tensor([t0, t1], dtype=y0[0].dtype, device=y0[0].device)
    out = torchdiffeq.odeint(clamped, y0, tt, rtol=rtol, atol=atol, method=method)
    return tuple(o[-1] for o in out)


def ode_sample(
    score_fn: ScoreFn,
    sde: SDE,
    x_init: Tensor,
    *,
    method: str = "dopri5",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    steps: int = 100,
    eps: float = 1e-3,
) -> tuple[Tensor, int]:
    """Sample by integrating the probability-flow ODE from t=1 (``x_init`` ~ prior) to ``eps``.

    ``method`` is 'heun' (fixed ``steps``, 2 evaluations each) or a torchdiffeq method
    ('dopri5', 'bosh3', ...; adaptive with ``rtol``/``atol``). Returns (samples, evaluations).
    """
    nfe = 0

    def func(t, state):
        nonlocal nfe
        nfe += 1
        x = state[0]
        tt = torch.full((x.shape[0],), float(t), dtype=x.dtype, device=x.device)
        return (probability_flow_drift(score_fn, sde, x, tt),)

    (x,) = _odeint(func, (x_init,), 1.0, eps, method=method, rtol=rtol, atol=atol, steps=steps)
    return x, nfe


@dataclass(frozen=True)
class LikelihoodResult:
    log_prob: Tensor  # (B,) log p_eps(x) in nats (of the data as given, no dequantization offset)
    prior_latent: Tensor  # x_1, the ODE's encoding of x
    nfe: int


def _divergence(fx: Tensor, x: Tensor, probe: Tensor | None) -> Tensor:
    """Exact trace of d f / d x (one backward pass per dimension), or Hutchinson's z^T J z."""
    if probe is not None:
        (vjp,) = torch.autograd.grad(fx, x, probe, create_graph=False)
        return (vjp * probe).reshape(x.shape[0], -1).sum(-1)
    flat = fx.reshape(x.shape[0], -1)
    div = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    for i in range(flat.shape[1]):
        (g,) = torch.autograd.grad(flat[:, i].sum(), x, retain_graph=i < flat.shape[1] - 1)
        div = div + g.reshape(x.shape[0], -1)[:, i]
    return div


def ode_likelihood(
    score_fn: ScoreFn,
    sde: SDE,
    x: Tensor,
    *,
    divergence: str = "hutchinson",
    method: str = "dopri5",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    steps: int = 200,
    eps: float = 1e-5,
    generator: torch.Generator | None = None,
) -> LikelihoodResult:
    """log p_eps(x) = log p_1(x_1) + int_eps^1 div f~(x_t, t) dt (instantaneous change of variables, App. D.2).

    ``divergence`` 'exact' traces the Jacobian with one backward pass per dimension (small D);
    'hutchinson' uses one Rademacher probe per example, fixed along the trajectory (unbiased).
    """
    if divergence not in ("exact", "hutchinson"):
        raise ValueError(f"divergence: {divergence!r} is not allowed; expected 'exact' or 'hutchinson'")
    probe = None
    if divergence == "hutchinson":
        probe = torch.randint(0, 2, x.shape, generator=generator, device=x.device).to(x.dtype) * 2 - 1
    nfe = 0

    def func(t, state):
        nonlocal nfe
        nfe += 1
        xt = state[0]
        with torch.enable_grad():
            xt = xt.detach().requires_grad_(True)
            tt = torch.full((xt.shape[0],), float(t), dtype=xt.dtype, device=xt.device)
            fx = probability_flow_drift(score_fn, sde, xt, tt)
            div = _divergence(fx, xt, probe)
        return fx.detach(), div.detach()

    zero = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    z, delta = _odeint(func, (x, zero), eps, 1.0, method=method, rtol=rtol, atol=atol, steps=steps)
    return LikelihoodResult(sde.prior_log_prob(z) + delta, z, nfe)


def bits_per_dim(log_prob: Tensor, num_dims: int, *, num_bins: int = 256, data_range: float = 2.0) -> Tensor:
    """-log p / (D ln 2) + log2(num_bins / data_range): bits/dim of the discrete data.

    ``log_prob`` is the continuous log-density of uniformly dequantized data (see
    :func:`uniform_dequantize`) spread over an interval of width ``data_range``; the offset is
    the log-Jacobian of mapping the bins [k, k+1) onto that interval. For a discrete model's
    log-probability (VDM) pass ``num_bins=data_range`` to drop the offset.
    """
    return -log_prob / (num_dims * math.log(2)) + math.log2(num_bins / data_range)


def uniform_dequantize(x: Tensor, *, num_bins: int = 256, generator: torch.Generator | None = None) -> Tensor:
    """Map data on the grid k / (num_bins - 1) * 2 - 1 to (k + u) / num_bins * 2 - 1, u ~ U[0, 1)."""
    k = torch.round((x + 1) * (num_bins - 1) / 2)
    u = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    return (k + u) / num_bins * 2 - 1


# ---------------------------------------------------------------------------------------------
# Denoising score matching (eq. 7) and the objective factory


def dsm_loss(
    score_fn: ScoreFn,
    sde: SDE,
    x0: Tensor,
    *,
    weighting: str = "sigma2",
    eps: float = 1e-5,
    reduce_mean: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Per-example DSM loss lambda(t) ||s(x_t, t) - grad log p_0t(x_t | x_0)||^2, t ~ U(eps, 1).

    ``weighting`` 'sigma2': lambda = sigma(t)^2, i.e. ||sigma s + z||^2 (the paper's default);
    'likelihood': lambda = g(t)^2, which makes the loss an upper bound on the negative
    log-likelihood (Song, Durkan, Murray & Ermon 2021, Theorem 1).
    """
    b = x0.shape[0]
    t = torch.rand(b, generator=generator, dtype=x0.dtype, device=x0.device) * (1 - eps) + eps
    z = _randn_like(x0, generator)
    alpha, sigma = sde.marginal(t)
    s = append_dims(sigma, x0.ndim)
    score = score_fn(append_dims(alpha, x0.ndim) * x0 + s * z, t)
    if weighting == "sigma2":
        losses = (score * s + z) ** 2
    elif weighting == "likelihood":
        _, g = sde.coefficients(t)
        losses = (score + z / s) ** 2 * append_dims(g, x0.ndim) ** 2
    else:
        raise ValueError(f"weighting: {weighting!r} is not allowed; expected 'sigma2' or 'likelihood'")
    losses = losses.reshape(b, -1)
    return losses.mean(-1) if reduce_mean else losses.sum(-1)


class SDEObjective(PerExampleObjective, nn.Module):
    """Training objective ``loss(model, x0, y=None, *, generator) -> (B,)`` for a score SDE."""

    def __init__(
        self,
        sde: SDE,
        *,
        weighting: str = "sigma2",
        parameterization: str = "eps",
        eps: float = 1e-5,
        reduce_mean: bool = True,
    ) -> None:
        super().__init__()
        if weighting not in ("sigma2", "likelihood"):
            raise ValueError(f"weighting: {weighting!r} is not allowed; expected 'sigma2' or 'likelihood'")
        _check_parameterization(parameterization)
        if parameterization == "v" and isinstance(sde, VESDE):
            raise ValueError("parameterization: 'v' is not allowed for the VE SDE (needs alpha^2 + sigma^2 = 1)")
        if not 0 < eps < 1:
            raise ValueError(f"eps: {eps} is not allowed; expected 0 < eps < 1")
        self.sde, self.weighting, self.parameterization = sde, weighting, parameterization
        self.eps, self.reduce_mean = eps, reduce_mean

    def forward(self, model, x0: Tensor, y: Tensor | None = None, *, generator=None) -> Tensor:
        score_fn = score_fn_from_model(model, self.sde, self.parameterization, y)
        return dsm_loss(
            score_fn,
            self.sde,
            x0,
            weighting=self.weighting,
            eps=self.eps,
            reduce_mean=self.reduce_mean,
            generator=generator,
        )

    def score_fn(self, model, y: Tensor | None = None) -> ScoreFn:
        """The sampling-time view of a model trained with this objective."""
        return score_fn_from_model(model, self.sde, self.parameterization, y)
