"""Samplers over a model callable: DDPM ancestral, DDIM (any eta), DDIM inversion, slerp.

All take the same keyword style and run over the schedule they are given, so respaced sampling
is `ddim_sample(model, respace(schedule, "ddim50"), ...)`. Step i of a schedule moves x from
abar_i to abar_{i-1} (abar_{-1} = 1). Noise is a pure function of (seed, original timestep), so a
sample depends only on its own seed, not on batch size or position (see noise_from_seeds for devices).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .gaussian import (
    PARAMETERIZATIONS,
    VARIANCES,
    check_choice,
    check_x,
    extract,
    model_timesteps,
    p_mean_variance,
)
from .schedules import Schedule

__all__ = ["ddim_invert", "ddim_sample", "ddim_step", "ddpm_sample", "ddpm_step", "noise_from_seeds", "slerp"]

Model = Callable[..., Tensor]
CondFn = Callable[[Tensor, Tensor, Tensor | None], Tensor]
Progress = Callable[[int, int], None]

_M32 = 0xFFFFFFFF


# -- per-sample counter-based noise --------------------------------------------------------------


def _mul32(x: Tensor, c: int) -> Tensor:
    """(x * c) mod 2^32 for x < 2^32 in int64, split so no product overflows."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _mix32(x: Tensor) -> Tensor:
    """A 32-bit integer finaliser (xorshift-multiply, 'lowbias32' constants); bijective on 0..2^32-1."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _check_seeds(seeds: Sequence[int] | Tensor, batch: int | None = None) -> Tensor:
    s = torch.as_tensor(seeds)
    if s.ndim != 1 or s.dtype not in (torch.int64, torch.int32) or (s.numel() and s.min() < 0):
        raise ValueError(f"seeds: {seeds!r} is not allowed; expected a 1-D sequence of non-negative ints")
    if batch is not None and s.numel() != batch:
        raise ValueError(f"seeds: {s.numel()} seeds are not allowed for a batch of {batch}; expected one seed per sample")
    return s.to(torch.int64)


def noise_from_seeds(
    seeds: Sequence[int] | Tensor,
    shape_per_sample: Sequence[int],
    step: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """Standard normal noise (B, *shape_per_sample); sample b's noise is a function of (seeds[b], step) only.

    A 32-bit key hashed from (seed, step) picks each sample's stream, so the noise does not depend on
    batch size or position. Samples of at least ``_GENERATOR_MIN_NUMEL`` elements (images) draw from
    a torch.Generator seeded with the key on the target device (as fast as torch.randn; CPU and CUDA
    generators differ, so such noise is reproducible per device type, not across them); smaller
    samples, where a per-sample call would cost more than the draw, use a counter-based hash of
    (key, element) -> Box-Muller, identical on every device. Values are drawn in fp32 (the hash in
    fp64) and then cast to ``dtype``.
    """
    s = _check_seeds(seeds)
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step: {step!r} is not allowed; expected an int >= 0")
    shape = tuple(shape_per_sample)
    n = math.prod(shape)
    if n < _GENERATOR_MIN_NUMEL:
        return _hash_normal(_sample_keys(s.to(device), step), n).reshape(s.shape[0], *shape).to(dtype)
    return _generator_normal(_sample_keys(s, step), shape, device).to(dtype)


# Per-sample size from which a Generator per sample is faster than the vectorised hash (about
# 2.5 us of call overhead per sample against ~18 ns per hashed element on one CPU core).
_GENERATOR_MIN_NUMEL = 256


def _sample_keys(s: Tensor, step: int) -> Tensor:
    """(B,) 32-bit keys from (seed, step): a chain of 32-bit finalisers."""
    # odd additive constants keep 0 from being a fixed point of the chain (mix32(0) = 0)
    key = _mix32(((s >> 32) & _M32) ^ 0x9E3779B9)
    key = _mix32((key + (s & _M32) + 0x7F4A7C15) & _M32)
    key = _mix32((key + (step & _M32) + 0x85EBCA6B) & _M32)
    return _mix32((key + ((step >> 32) & _M32) + 0xC2B2AE35) & _M32)


def _generator_normal(keys: Tensor, shape: tuple[int, ...], device: torch.device | str | None) -> Tensor:
    """One torch.Generator stream per sample, seeded with its key (EDM's StackedRandomGenerator idea)."""
    device = torch.device("cpu") if device is None else torch.device(device)
    out = torch.empty((keys.shape[0], *shape), dtype=torch.float32, device=device)
    gen = torch.Generator(device=device)
    for b, key in enumerate(keys.tolist()):
        gen.manual_seed(key)
        out[b].normal_(generator=gen)
    return out


def _hash_normal(key: Tensor, n: int) -> Tensor:
    """(B, n) normals from a hash of (key, element index) -> Box-Muller, on key's device."""
    half = (n + 1) // 2
    ctr = _mix32((torch.arange(2 * half, device=key.device, dtype=torch.int64) + 0x27D4EB2F) & _M32)
    bits = _mix32((_mix32(key[:, None] ^ ctr[None]) + key[:, None] + 0x165667B1) & _M32)  # (B, 2*half)
    u1 = (bits[:, :half].to(torch.float64) + 0.5) / 2**32  # in (0, 1)
    u2 = bits[:, half:].to(torch.float64) / 2**32
    r = torch.sqrt(-2 * torch.log(u1))
    return torch.cat([r * torch.cos(2 * math.pi * u2), r * torch.sin(2 * math.pi * u2)], dim=1)[:, :n]


# -- single steps ----------------------------------------------------------------------------------


def _t_index(x: Tensor, i: int, schedule: Schedule) -> Tensor:
    if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < schedule.num_timesteps:
        raise ValueError(f"i: {i!r} is not allowed; expected an int in 0..{schedule.num_timesteps - 1}")
    return torch.full((x.shape[0],), i, dtype=torch.int64, device=x.device)


def ddpm_step(
    model: Model,
    schedule: Schedule,
    x: Tensor,
    i: int,
    *,
    noise: Tensor | None = None,
    y: Tensor | None = None,
    clip_denoised: bool = True,
    parameterization: str = "eps",
    variance: str = "fixed_small",
    cond_fn: CondFn | None = None,
    model_kwargs: dict[str, Any] | None = None,
) -> tuple[Tensor, Tensor]:
    """DDPM Algorithm 2, one step: x_{i-1} = mu_theta + sigma z (no noise at i = 0); returns (x_{i-1}, x_0-hat).

    cond_fn(x, t, y) = grad log p(y | x_t) shifts the mean by Sigma * grad (ADM Algorithm 1).
    """
    t_index = _t_index(x, i, schedule)
    out = p_mean_variance(
        model, schedule, x, t_index, y,
        parameterization=parameterization, variance=variance, clip_denoised=clip_denoised, model_kwargs=model_kwargs,
    )
    mean = out.mean
    if cond_fn is not None:
        mean = mean + out.variance * cond_fn(x, model_timesteps(schedule, t_index), y).to(x.dtype)
    if i == 0:
        return mean, out.pred_x0
    if noise is None:
        noise = torch.randn_like(x)
    return mean + torch.exp(0.5 * out.log_variance) * noise, out.pred_x0


def ddim_step(
    model: Model,
    schedule: Schedule,
    x: Tensor,
    i: int,
    *,
    eta: float = 0.0,
    noise: Tensor | None = None,
    y: Tensor | None = None,
    clip_denoised: bool = True,
    parameterization: str = "eps",
    variance: str = "fixed_small",
    cond_fn: CondFn | None = None,
    model_kwargs: dict[str, Any] | None = None,
) -> tuple[Tensor, Tensor]:
    """DDIM eq. 12, one step from abar_i to abar_{i-1}; eta = 1 has DDPM's posterior variance (eq. 16).

    cond_fn shifts eps by -sqrt(1 - abar) * grad log p(y | x_t) (ADM Algorithm 2). Returns (x_{i-1}, x_0-hat).
    """
    if not eta >= 0:
        raise ValueError(f"eta: {eta!r} is not allowed; expected eta >= 0")
    t_index = _t_index(x, i, schedule)
    out = p_mean_variance(
        model, schedule, x, t_index, y,
        parameterization=parameterization, variance=variance, clip_denoised=clip_denoised, model_kwargs=model_kwargs,
    )
    pred_x0, eps = out.pred_x0, out.eps
    abar = extract(schedule.alphas_cumprod, t_index, x)
    if cond_fn is not None:
        eps = eps - (1 - abar).sqrt() * cond_fn(x, model_timesteps(schedule, t_index), y).to(x.dtype)
        pred_x0 = (x - (1 - abar).sqrt() * eps) / abar.sqrt()
    abar_prev = extract(schedule.alphas_cumprod_prev, t_index, x)
    sigma = eta * ((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)).sqrt()  # DDIM eq. 16
    x_prev = abar_prev.sqrt() * pred_x0 + (1 - abar_prev - sigma**2).clamp(min=0).sqrt() * eps
    if eta > 0 and i > 0:
        x_prev = x_prev + sigma * (torch.randn_like(x) if noise is None else noise)
    return x_prev, pred_x0


# -- full chains ------------------------------------------------------------------------------------


def _start(
    schedule: Schedule, shape: Sequence[int], seeds: Sequence[int] | Tensor, x_T: Tensor | None,
    parameterization: str, variance: str, dtype: torch.dtype, device: torch.device | str | None,
) -> tuple[Tensor, Tensor]:
    check_choice("parameterization", parameterization, PARAMETERIZATIONS)
    check_choice("variance", variance, VARIANCES)
    shape = tuple(shape)
    if len(shape) < 2 or any(not isinstance(d, int) or d < 1 for d in shape):
        raise ValueError(f"shape: {shape!r} is not allowed; expected (B, ...) with ndim >= 2 and positive ints")
    s = _check_seeds(seeds, shape[0])
    if x_T is None:
        return s, noise_from_seeds(s, shape[1:], 0, dtype=dtype, device=device)
    check_x("x_T", x_T)
    if tuple(x_T.shape) != shape:
        raise ValueError(f"x_T: shape {tuple(x_T.shape)} is not allowed; expected {shape}")
    return s, x_T


def _step_noise(seeds: Tensor, x: Tensor, schedule: Schedule, i: int) -> Tensor:
    """Noise of step i, keyed by its original timestep + 1 (key 0 is x_T)."""
    return noise_from_seeds(seeds, x.shape[1:], int(schedule.timestep_map[i]) + 1, dtype=x.dtype, device=x.device)


def ddpm_sample(
    model: Model,
    schedule: Schedule,
    shape: Sequence[int],
    *,
    seeds: Sequence[int] | Tensor,
    y: Tensor | None = None,
    clip_denoised: bool = True,
    parameterization: str = "eps",
    variance: str = "fixed_small",
    cond_fn: CondFn | None = None,
    progress: Progress | None = None,
    model_kwargs: dict[str, Any] | None = None,
    x_T: Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """DDPM Algorithm 2: ancestral sampling from x_T ~ N(0, I) over every step of `schedule`."""
    seeds, x = _start(schedule, shape, seeds, x_T, parameterization, variance, dtype, device)
    n = schedule.num_timesteps
    for k, i in enumerate(reversed(range(n))):
        noise = _step_noise(seeds, x, schedule, i) if i > 0 else None
        x, _ = ddpm_step(
            model, schedule, x, i, noise=noise, y=y, clip_denoised=clip_denoised,
            parameterization=parameterization, variance=variance, cond_fn=cond_fn, model_kwargs=model_kwargs,
        )
        if progress is not None:
            progress(k + 1, n)
    return x


def ddim_sample(
    model: Model,
    schedule: Schedule,
    shape: Sequence[int],
    *,
    seeds: Sequence[int] | Tensor,
    eta: float = 0.0,
    x_T: Tensor | None = None,
    y: Tensor | None = None,
    clip_denoised: bool = True,
    parameterization: str = "eps",
    variance: str = "fixed_small",
    cond_fn: CondFn | None = None,
    progress: Progress | None = None,
    model_kwargs: dict[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """DDIM (Song et al. 2021) eq. 12 over every step of `schedule`; eta = 0 is deterministic given x_T."""
    seeds, x = _start(schedule, shape, seeds, x_T, parameterization, variance, dtype, device)
    n = schedule.num_timesteps
    for k, i in enumerate(reversed(range(n))):
        noise = _step_noise(seeds, x, schedule, i) if (eta > 0 and i > 0) else None
        x, _ = ddim_step(
            model, schedule, x, i, eta=eta, noise=noise, y=y, clip_denoised=clip_denoised,
            parameterization=parameterization, variance=variance, cond_fn=cond_fn, model_kwargs=model_kwargs,
        )
        if progress is not None:
            progress(k + 1, n)
    return x


def ddim_invert(
    model: Model,
    schedule: Schedule,
    x0: Tensor,
    *,
    y: Tensor | None = None,
    parameterization: str = "eps",
    variance: str = "fixed_small",
    progress: Progress | None = None,
    model_kwargs: dict[str, Any] | None = None,
) -> Tensor:
    """DDIM eq. 13 run forward (x_0 -> x_T): the deterministic encoder that ddim_sample(eta=0) inverts.

    Step i moves x from abar_{i-1} (1 for i = 0) to abar_i with eps evaluated at the current x and
    step max(i-1, 0), the mirror of ddim_step; the round trip error is O(1/steps).
    """
    check_x("x0", x0)
    x = x0
    n = schedule.num_timesteps
    for i in range(n):
        j = max(i - 1, 0)
        t_index = torch.full((x.shape[0],), j, dtype=torch.int64, device=x.device)
        eps = p_mean_variance(
            model, schedule, x, t_index, y,
            parameterization=parameterization, variance=variance, model_kwargs=model_kwargs,
        ).eps
        idx = torch.full_like(t_index, i)
        abar_from = extract(schedule.alphas_cumprod_prev, idx, x)
        abar_to = extract(schedule.alphas_cumprod, idx, x)
        pred_x0 = (x - (1 - abar_from).sqrt() * eps) / abar_from.sqrt()
        x = abar_to.sqrt() * pred_x0 + (1 - abar_to).sqrt() * eps
        if progress is not None:
            progress(i + 1, n)
    return x


def slerp(z0: Tensor, z1: Tensor, alpha: float | Tensor) -> Tensor:
    """Spherical interpolation between latents (DDIM sec. 5.3), per example over all non-batch dims."""
    if z0.shape != z1.shape:
        raise ValueError(f"z1: shape {tuple(z1.shape)} is not allowed; expected the shape of z0 {tuple(z0.shape)}")
    a = torch.as_tensor(alpha, dtype=torch.float64, device=z0.device)
    if a.ndim > 1 or (a.ndim == 1 and a.shape[0] != z0.shape[0]) or (a < 0).any() or (a > 1).any():
        raise ValueError(f"alpha: {alpha!r} is not allowed; expected a number or ({z0.shape[0]},) values in [0, 1]")
    a = a.reshape(-1, *([1] * (z0.ndim - 1)))
    f0, f1 = z0.flatten(1).to(torch.float64), z1.flatten(1).to(torch.float64)
    cos = (f0 * f1).sum(1) / (f0.norm(dim=1) * f1.norm(dim=1)).clamp(min=1e-300)
    theta = torch.arccos(cos.clamp(-1, 1)).reshape(-1, *([1] * (z0.ndim - 1)))
    sin = torch.sin(theta)
    near = sin.abs() < 1e-8  # (almost) parallel: fall back to linear interpolation
    w0 = torch.where(near, 1 - a, torch.sin((1 - a) * theta) / torch.where(near, 1.0, sin))
    w1 = torch.where(near, a, torch.sin(a * theta) / torch.where(near, 1.0, sin))
    return (w0 * z0.to(torch.float64) + w1 * z1.to(torch.float64)).to(z0.dtype)
