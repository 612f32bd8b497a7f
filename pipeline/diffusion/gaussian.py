"""Forward process, posterior, parameterisations and the reverse-step Gaussian p(x_{t-1} | x_t).

Indices `t_index` are (B,) int64 positions in the given schedule (0..N-1); the model is always
called with the ORIGINAL timestep `schedule.timestep_map[t_index]` as a float tensor. The
schedule's float64 coefficients are gathered and cast to the dtype of x.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .schedules import Schedule

__all__ = [
    "PARAMETERIZATIONS",
    "VARIANCES",
    "PMeanVariance",
    "check_choice",
    "check_t_index",
    "extract",
    "model_log_variance",
    "model_timesteps",
    "oracle_model",
    "output_from_x0_eps",
    "p_mean_variance",
    "p_mean_variance_from_output",
    "q_mean_variance",
    "q_posterior_mean_variance",
    "q_sample",
    "split_output",
    "x0_eps_from_output",
]

PARAMETERIZATIONS = ("eps", "x0", "v")
VARIANCES = ("fixed_small", "fixed_large", "learned_range")

Model = Callable[..., Tensor]


class PMeanVariance(NamedTuple):
    """The reverse step N(mean, variance) and the model's implied x_0 and epsilon."""

    mean: Tensor
    variance: Tensor
    log_variance: Tensor
    pred_x0: Tensor
    eps: Tensor


# -- validation ------------------------------------------------------------------------------


def check_choice(name: str, value: object, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{name}: {value!r} is not allowed; expected one of {', '.join(map(repr, allowed))}")
    return value  # type: ignore[return-value]


def check_x(name: str, x: Tensor) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim < 2:
        desc = f"{x.dtype} of shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name}: {desc} is not allowed; expected a floating tensor of shape (B, ...) with ndim >= 2")


def check_t_index(t_index: Tensor, schedule: Schedule, batch: int) -> None:
    if not isinstance(t_index, Tensor) or t_index.dtype != torch.int64 or t_index.shape != (batch,):
        desc = f"{t_index.dtype} of shape {tuple(t_index.shape)}" if isinstance(t_index, Tensor) else repr(t_index)
        raise ValueError(f"t_index: {desc} is not allowed; expected an int64 tensor of shape ({batch},)")
    n = schedule.num_timesteps
    if batch and (t_index.min() < 0 or t_index.max() >= n):
        raise ValueError(
            f"t_index: values in [{t_index.min().item()}, {t_index.max().item()}] are not allowed; expected 0..{n - 1}"
        )


def check_same_shape(name: str, a: Tensor, ref: Tensor) -> None:
    if a.shape != ref.shape or a.dtype != ref.dtype:
        raise ValueError(
            f"{name}: {a.dtype} of shape {tuple(a.shape)} is not allowed; expected {ref.dtype} of shape {tuple(ref.shape)}"
        )


def extract(arr: Tensor, t_index: Tensor, x: Tensor) -> Tensor:
    """Gather a float64 schedule array at t_index, cast to x's dtype, shaped (B, 1, ..., 1)."""
    out = arr.to(device=x.device)[t_index.to(x.device)].to(x.dtype)
    return out.reshape(-1, *([1] * (x.ndim - 1)))


def model_timesteps(schedule: Schedule, t_index: Tensor) -> Tensor:
    """The ORIGINAL timesteps (float) that the model is called with."""
    return schedule.timestep_map.to(t_index.device)[t_index].to(torch.float32)


# -- forward process and posterior ----------------------------------------------------------------


def q_mean_variance(schedule: Schedule, x0: Tensor, t_index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """DDPM eq. 4: q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I); returns mean, variance, log variance."""
    mean = extract(schedule.sqrt_alphas_cumprod, t_index, x0) * x0
    var = extract(1 - schedule.alphas_cumprod, t_index, x0)
    return mean, var.expand_as(x0), torch.log(var).expand_as(x0)


def q_sample(schedule: Schedule, x0: Tensor, t_index: Tensor, noise: Tensor) -> Tensor:
    """DDPM eq. 4 (reparameterised): x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps."""
    check_x("x0", x0)
    check_t_index(t_index, schedule, x0.shape[0])
    check_same_shape("noise", noise, x0)
    a = extract(schedule.sqrt_alphas_cumprod, t_index, x0)
    s = extract(schedule.sqrt_one_minus_alphas_cumprod, t_index, x0)
    return a * x0 + s * noise


def q_posterior_mean_variance(schedule: Schedule, x0: Tensor, x_t: Tensor, t_index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """DDPM eqs. 6-7: q(x_{t-1} | x_t, x_0) = N(mu-tilde, beta-tilde I); returns mean, variance, clipped log variance."""
    mean = extract(schedule.posterior_mean_coef1, t_index, x_t) * x0 + extract(schedule.posterior_mean_coef2, t_index, x_t) * x_t
    var = extract(schedule.posterior_variance, t_index, x_t).expand_as(x_t)
    logvar = extract(schedule.posterior_log_variance_clipped, t_index, x_t).expand_as(x_t)
    return mean, var, logvar


# -- parameterisations ----------------------------------------------------------------------------


def x0_eps_from_output(pred: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor, parameterization: str) -> tuple[Tensor, Tensor]:
    """(x_0, eps) implied by a network output, for x_t = alpha x_0 + sigma eps with alpha^2 + sigma^2 = 1."""
    if parameterization == "eps":  # DDPM eq. 11 rearranged: x_0 = (x_t - sigma eps) / alpha
        return (x_t - sigma * pred) / alpha, pred
    if parameterization == "x0":
        return pred, (x_t - alpha * pred) / sigma
    if parameterization == "v":  # Salimans & Ho 2022 sec. 4: x_0 = alpha x_t - sigma v, eps = sigma x_t + alpha v
        return alpha * x_t - sigma * pred, sigma * x_t + alpha * pred
    check_choice("parameterization", parameterization, PARAMETERIZATIONS)
    raise AssertionError


def output_from_x0_eps(x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor, parameterization: str) -> Tensor:
    """The regression target for a parameterisation: eps, x_0, or v = alpha eps - sigma x_0."""
    if parameterization == "eps":
        return eps
    if parameterization == "x0":
        return x0
    if parameterization == "v":
        return alpha * eps - sigma * x0
    check_choice("parameterization", parameterization, PARAMETERIZATIONS)
    raise AssertionError


def split_output(out: Tensor, x_t: Tensor, variance: str) -> tuple[Tensor, Tensor | None]:
    """Split a model output into the prediction and, for 'learned_range', the interpolation v in [-1, 1]."""
    check_choice("variance", variance, VARIANCES)
    channels = x_t.shape[1]
    want = 2 * channels if variance == "learned_range" else channels
    if out.shape != (x_t.shape[0], want, *x_t.shape[2:]):
        raise ValueError(
            f"model output: shape {tuple(out.shape)} is not allowed; expected {(x_t.shape[0], want, *x_t.shape[2:])} "
            f"for variance={variance!r}"
        )
    out = out.to(x_t.dtype)
    if variance == "learned_range":
        return out[:, :channels], out[:, channels:]
    return out, None


def model_log_variance(schedule: Schedule, t_index: Tensor, x_t: Tensor, variance: str, v: Tensor | None = None) -> Tensor:
    """log Sigma_theta: fixed small (beta-tilde), fixed large (beta; beta-tilde_1 at t=0), or learned range.

    learned_range is Improved DDPM eq. 15: log Sigma = frac log beta + (1 - frac) log beta-tilde, frac = (v + 1) / 2.
    """
    check_choice("variance", variance, VARIANCES)
    small = schedule.posterior_log_variance_clipped
    if variance == "fixed_small":
        return extract(small, t_index, x_t).expand_as(x_t)
    large = torch.log(schedule.betas)
    if variance == "fixed_large":
        # beta-tilde at t=0 so the decoder at t=0 is not wider than the posterior (as Improved DDPM)
        return extract(torch.cat([small[:1], large[1:]]), t_index, x_t).expand_as(x_t)
    if v is None:
        raise ValueError("v: None is not allowed for variance='learned_range'; expected the model's extra channels")
    frac = (v + 1) / 2
    return frac * extract(large, t_index, x_t) + (1 - frac) * extract(small, t_index, x_t)


def p_mean_variance_from_output(
    out: Tensor,
    schedule: Schedule,
    x_t: Tensor,
    t_index: Tensor,
    *,
    parameterization: str = "eps",
    variance: str = "fixed_small",
    clip_denoised: bool = False,
) -> PMeanVariance:
    """p(x_{t-1} | x_t) from a raw model output: mean = mu-tilde(x_t, x_0-hat) (DDPM eq. 7 with x_0 predicted)."""
    check_choice("parameterization", parameterization, PARAMETERIZATIONS)
    pred, v = split_output(out, x_t, variance)
    alpha = extract(schedule.sqrt_alphas_cumprod, t_index, x_t)
    sigma = extract(schedule.sqrt_one_minus_alphas_cumprod, t_index, x_t)
    pred_x0, eps = x0_eps_from_output(pred, x_t, alpha, sigma, parameterization)
    if clip_denoised:
        pred_x0 = pred_x0.clamp(-1, 1)
        eps = (x_t - alpha * pred_x0) / sigma  # keep eps consistent with the clipped x_0 (as DDIM sampling needs)
    mean, _, _ = q_posterior_mean_variance(schedule, pred_x0, x_t, t_index)
    log_var = model_log_variance(schedule, t_index, x_t, variance, v)
    return PMeanVariance(mean, torch.exp(log_var), log_var, pred_x0, eps)


def p_mean_variance(
    model: Model,
    schedule: Schedule,
    x_t: Tensor,
    t_index: Tensor,
    y: Tensor | None = None,
    *,
    parameterization: str = "eps",
    variance: str = "fixed_small",
    clip_denoised: bool = False,
    model_kwargs: dict[str, Any] | None = None,
) -> PMeanVariance:
    """Call the model at the original timesteps of t_index and return p(x_{t-1} | x_t), x_0-hat and eps-hat."""
    check_x("x_t", x_t)
    check_t_index(t_index, schedule, x_t.shape[0])
    check_choice("parameterization", parameterization, PARAMETERIZATIONS)
    check_choice("variance", variance, VARIANCES)
    out = model(x_t, model_timesteps(schedule, t_index), y=y, **(model_kwargs or {}))
    return p_mean_variance_from_output(
        out, schedule, x_t, t_index, parameterization=parameterization, variance=variance, clip_denoised=clip_denoised
    )


# -- the Gaussian-mixture oracle as a model ----------------------------------------------------------


def oracle_model(mixture: Any, schedule: Schedule, parameterization: str = "eps", learned_v: float | None = None) -> Model:
    """The optimal network for `mixture` (a GaussianMixture) under this schedule: model(x, t, y=None).

    t are original timesteps (looked up in schedule.timestep_map; pass the unrespaced schedule to
    serve every t); alpha = sqrt(abar_t), sigma = sqrt(1 - abar_t). With learned_v, the output
    gets C extra channels filled with that value (learned_range's v: -1 is beta-tilde, +1 is beta).
    """
    check_choice("parameterization", parameterization, PARAMETERIZATIONS)
    tmap, abar = schedule.timestep_map, schedule.alphas_cumprod

    def model(x: Tensor, t: Tensor, y: Tensor | None = None, **_: Any) -> Tensor:
        t_long = t.detach().round().to(torch.int64).cpu()
        idx = torch.searchsorted(tmap, t_long).clamp(max=len(tmap) - 1)
        if not torch.equal(tmap[idx], t_long):
            raise ValueError(f"t: {t_long.tolist()} is not allowed; expected timesteps of this schedule's timestep_map")
        a = abar[idx].sqrt().to(x.device)
        s = (1 - abar[idx]).sqrt().to(x.device)
        out = mixture.predict(x, a, s, parameterization, y)
        if learned_v is not None:
            out = torch.cat([out, torch.full_like(out, learned_v)], dim=1)
        return out

    return model
