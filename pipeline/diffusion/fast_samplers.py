"""Few-step samplers over a denoiser: EDM's Heun sampler and DPM-Solver++(2M).

Both work in the noise-level form of Karras et al. 2022 (EDM): x = x0 + sigma n, a denoiser
``D(x, sigma) -> E[x0 | x]`` with sigma of shape (B,), and a decreasing list of noise levels
ending in 0 (:func:`karras_sigmas`). Any model is adapted to a denoiser once:

- :func:`denoiser_from_score_fn` for a continuous-time ``score_fn(x, t)`` of a VP/sub-VP/VE SDE
  (x_t = alpha(t) x with sigma(t) / alpha(t) = sigma; EDM Sec. 3 "scaling" s(t) = alpha(t)),
- :func:`denoiser_from_sigma_score` for an NCSN ``score_fn(x, sigma)`` (Tweedie),
- :func:`denoiser_from_discrete` for a discrete DDPM-family ``model(x, t, y)`` and its schedule
  (sigma is rounded to the nearest trained level and the model gets that original timestep),
- the Gaussian-mixture oracle directly: ``lambda x, s: mixture.denoise(x, 1.0, s)``.

Samplers start from ``x_init = sigmas[0] * N(0, I)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from pipeline.diffusion.gaussian import x0_eps_from_output
from pipeline.diffusion.schedules import Schedule
from pipeline.diffusion.sde import SDE, ScoreFn, append_dims, make_noise_fn, prediction_to_x0

__all__ = [
    "Denoiser",
    "ddim_sigma_sample",
    "euler_sample",
    "denoiser_from_discrete",
    "denoiser_from_score_fn",
    "denoiser_from_sigma_score",
    "discrete_sigmas",
    "dpm_solver_pp_2m_sample",
    "edm_heun_sample",
    "karras_sigmas",
    "round_sigmas",
]

Denoiser = Callable[[Tensor, Tensor], Tensor]


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """EDM eq. 5: sigma_i = (s_max^(1/rho) + i/(n-1) (s_min^(1/rho) - s_max^(1/rho)))^rho, then 0; float64 (n+1,)."""
    if n < 1 or not 0 < sigma_min <= sigma_max:
        raise ValueError(
            f"n/sigma_min/sigma_max: ({n}, {sigma_min}, {sigma_max}) not allowed; need n >= 1, 0 < min <= max"
        )
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return torch.cat([(hi + ramp * (lo - hi)) ** rho, torch.zeros(1, dtype=torch.float64)])


def _check_sigmas(sigmas: Tensor) -> Tensor:
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    if sigmas.ndim != 1 or len(sigmas) < 2 or (sigmas[1:] >= sigmas[:-1]).any() or sigmas[-1] < 0:
        raise ValueError(f"sigmas: {sigmas.tolist()} not allowed; expected a strictly decreasing list ending >= 0")
    return sigmas


def _level(x: Tensor, sigma: float) -> Tensor:
    return torch.full((x.shape[0],), sigma, dtype=x.dtype, device=x.device)


def edm_heun_sample(
    denoiser: Denoiser,
    x_init: Tensor,
    sigmas: Tensor,
    *,
    churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
    seeds=None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """EDM Algorithm 2 (Algorithm 1 when churn = 0): Heun's 2nd-order method on dx/dsigma = (x - D) / sigma,
    with optional stochastic churn gamma_i = min(churn / N, sqrt(2) - 1) for sigma in [s_tmin, s_tmax];
    churn noise from per-sample ``seeds`` or ``generator``."""
    sigmas = _check_sigmas(sigmas)
    noise_fn = make_noise_fn(seeds=seeds, generator=generator)
    n = len(sigmas) - 1
    x = x_init
    for i in range(n):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        gamma = min(churn / n, math.sqrt(2) - 1) if s_tmin <= sigma <= s_tmax else 0.0
        sigma_hat = sigma * (1 + gamma)
        if gamma > 0:  # raise the noise level to sigma_hat (Algorithm 2, lines 5-6)
            x = x + math.sqrt(sigma_hat**2 - sigma**2) * s_noise * noise_fn(x, i + 1)
        d = (x - denoiser(x, _level(x, sigma_hat))) / sigma_hat
        x_next = x + (sigma_next - sigma_hat) * d  # Euler step
        if sigma_next > 0:  # 2nd-order correction (Algorithm 1, lines 9-11)
            d_next = (x_next - denoiser(x_next, _level(x, sigma_next))) / sigma_next
            x_next = x + (sigma_next - sigma_hat) * 0.5 * (d + d_next)
        x = x_next
    return x


def euler_sample(denoiser: Denoiser, x_init: Tensor, sigmas: Tensor) -> Tensor:
    """EDM Algorithm 1 without its 2nd-order correction: Euler steps on dx/dsigma = (x - D(x; sigma)) / sigma."""
    sigmas = _check_sigmas(sigmas)
    x = x_init
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        x = x + (sigma_next - sigma) * (x - denoiser(x, _level(x, sigma))) / sigma  # Algorithm 1, lines 4-5
    return x


def ddim_sigma_sample(denoiser: Denoiser, x_init: Tensor, sigmas: Tensor, *, eta: float = 0.0, seeds=None,
                      generator: torch.Generator | None = None) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12) written for x / alpha and sigma / alpha (any alpha, sigma): with
    x0 = D(x; s) and eps = (x - x0) / s, x' = x0 + sqrt(s'^2 - c^2) eps + c z, c = eta s' sqrt(1 - s'^2 / s^2).

    eta = 0 is the deterministic DDIM (an Euler step of the probability-flow ODE in these
    coordinates, Karras et al. 2022 sec. 3); eta = 1 is ancestral sampling."""
    sigmas = _check_sigmas(sigmas)
    noise_fn = make_noise_fn(seeds=seeds, generator=generator)
    x = x_init
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        x0 = denoiser(x, _level(x, sigma))
        c = eta * sigma_next * math.sqrt(max(1.0 - (sigma_next / sigma) ** 2, 0.0))
        x = x0 + math.sqrt(sigma_next**2 - c**2) * (x - x0) / sigma
        if c > 0:
            x = x + c * noise_fn(x, i + 1)
    return x


def dpm_solver_pp_2m_sample(denoiser: Denoiser, x_init: Tensor, sigmas: Tensor) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) with alpha = 1, lambda = -log sigma:
    x_i = (sigma_i / sigma_{i-1}) x_{i-1} - expm1(-h_i) D_i, D_i = (1 + 1/(2 r_i)) x0_i - 1/(2 r_i) x0_{i-1}."""
    sigmas = _check_sigmas(sigmas)
    x = x_init
    x0_prev, h_prev = None, None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        x0 = denoiser(x, _level(x, sigma))
        if sigma_next == 0:  # the last step lands on the denoised estimate
            return x0
        h = math.log(sigma / sigma_next)
        if x0_prev is None:  # first step: DPM-Solver++(1), i.e. DDIM
            d = x0
        else:
            r = h_prev / h
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
        x = (sigma_next / sigma) * x - math.expm1(-h) * d
        x0_prev, h_prev = x0, h
    return x


# ---------------------------------------------------------------------------------------------
# Adapters


def denoiser_from_score_fn(score_fn: ScoreFn, sde: SDE) -> Denoiser:
    """D(x, sigma) for a score SDE: t = t(sigma / alpha = sigma), x_t = alpha(t) x, D = Tweedie."""

    def denoiser(x: Tensor, sigma: Tensor) -> Tensor:
        t = sde.t_from_ratio(sigma)
        alpha, sig_t = sde.marginal(t)
        x_t = append_dims(alpha, x.ndim) * x
        return prediction_to_x0(score_fn(x_t, t), x_t, alpha, sig_t, "score")

    return denoiser


def denoiser_from_sigma_score(score_fn: Callable[[Tensor, Tensor], Tensor]) -> Denoiser:
    """D(x, sigma) = x + sigma^2 s(x, sigma) for a noise-conditional score (NCSN: x = x0 + sigma n)."""

    def denoiser(x: Tensor, sigma: Tensor) -> Tensor:
        return x + append_dims(sigma, x.ndim) ** 2 * score_fn(x, sigma)

    return denoiser


def discrete_sigmas(schedule: Schedule) -> Tensor:
    """The EDM noise levels sqrt((1 - abar) / abar) of a discrete schedule, increasing with the step."""
    abar = schedule.alphas_cumprod
    return torch.sqrt((1 - abar) / abar)


def round_sigmas(sigmas: Tensor, levels: Tensor) -> Tensor:
    """Each nonzero sigma replaced by the nearest (in log space) of ``levels`` (EDM's round_sigma);
    use with :func:`denoiser_from_discrete` so the sampler steps exactly between trained levels."""
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    pos = sigmas > 0
    idx = (torch.log(sigmas[pos])[:, None] - torch.log(levels.to(torch.float64))[None]).abs().argmin(-1)
    out = sigmas.clone()
    out[pos] = levels.to(torch.float64)[idx]
    return out


def denoiser_from_discrete(
    model, schedule: Schedule, *, parameterization: str = "eps", y: Tensor | None = None
) -> Denoiser:
    """D(x, sigma) for a discrete-time ``model(x, t, y)``: sigma is rounded (in log space) to the nearest
    level of ``schedule``; the model is called at that level's ORIGINAL timestep with x_t = sqrt(abar) x.

    The output's first C channels are used (learned-variance models return 2C).
    """
    log_levels = torch.log(discrete_sigmas(schedule))

    def denoiser(x: Tensor, sigma: Tensor) -> Tensor:
        distinct, which = torch.unique(sigma.to(torch.float64).cpu(), return_inverse=True)  # one search per level
        idx = (torch.log(distinct)[:, None] - log_levels[None]).abs().argmin(-1)[which]
        abar = schedule.alphas_cumprod[idx]
        a = append_dims(abar.sqrt().to(device=x.device, dtype=x.dtype), x.ndim)
        s = append_dims((1 - abar).sqrt().to(device=x.device, dtype=x.dtype), x.ndim)
        x_t = a * x
        t = schedule.timestep_map[idx].to(device=x.device, dtype=torch.float32)
        out = model(x_t, t, y)[:, : x.shape[1]]
        return x0_eps_from_output(out, x_t, a, s, parameterization)[0]

    return denoiser
