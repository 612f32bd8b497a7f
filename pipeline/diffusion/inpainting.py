"""Inpainting with the discrete samplers: replacement of the known pixels, with RePaint resampling.

At every step the known coordinates of x_{i-1} are replaced by a fresh forward sample
sqrt(abar_{i-1}) y + sqrt(1 - abar_{i-1}) eps of the known data y (Song et al. 2021, score-SDE
inpainting; Lugmayr et al. 2022, RePaint), and the unknown ones come from the model's step. With
``resample`` = U > 1 each step is repeated U times, re-noising x_{i-1} -> x_i with
q(x_i | x_{i-1}) = N(sqrt(1 - beta_i) x_{i-1}, beta_i I) in between (RePaint Algorithm 1, jump 1),
which lets the unknown part harmonise with the known one. The continuous samplers take
``known``/``mask`` directly (``pc_sample``, ``annealed_langevin_sample``).

Noise is a function of (seed, step, round) through ``noise_from_seeds``, so a completion depends
only on its own seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from pipeline.diffusion.gaussian import extract
from pipeline.diffusion.samplers import ddim_step, ddpm_step, noise_from_seeds
from pipeline.diffusion.schedules import Schedule

__all__ = ["inpaint_sample"]

_REPLACE_KEY = 1 << 36
_RENOISE_KEY = 1 << 37
_ROUND_KEY = 1 << 40


def inpaint_sample(
    model,
    schedule: Schedule,
    known: Tensor,
    mask: Tensor,
    *,
    seeds: Sequence[int] | Tensor,
    sampler: str = "ddpm",
    eta: float = 1.0,
    resample: int = 1,
    y: Tensor | None = None,
    clip_denoised: bool = True,
    parameterization: str = "eps",
    variance: str = "fixed_small",
    cond_fn=None,
    model_kwargs: dict[str, Any] | None = None,
) -> Tensor:
    """Complete ``known`` where ``mask`` is False, keeping it exactly where ``mask`` is True.

    ``sampler`` 'ddpm' (ancestral) or 'ddim' (with ``eta``; eta = 0 gives no mixing and is not
    recommended). All other keywords are those of ``ddpm_step``/``ddim_step``.
    """
    if sampler not in ("ddpm", "ddim"):
        raise ValueError(f"sampler: {sampler!r} is not allowed; expected 'ddpm' or 'ddim'")
    if resample < 1:
        raise ValueError(f"resample: {resample!r} is not allowed; expected an int >= 1")
    if mask.shape != known.shape and mask.expand_as(known).shape != known.shape:
        raise ValueError(f"mask: shape {tuple(mask.shape)} is not allowed; it must broadcast to {tuple(known.shape)}")
    mask = mask.to(torch.bool).expand_as(known)
    seeds = torch.as_tensor(seeds, dtype=torch.int64)
    shape = known.shape[1:]

    def noise(key: int) -> Tensor:
        return noise_from_seeds(seeds, shape, key, dtype=known.dtype, device=known.device)

    kwargs = dict(
        y=y, clip_denoised=clip_denoised, parameterization=parameterization, variance=variance,
        cond_fn=cond_fn, model_kwargs=model_kwargs,
    )
    x = noise(0)
    for i in reversed(range(schedule.num_timesteps)):
        t_key = int(schedule.timestep_map[i]) + 1
        idx = torch.full((known.shape[0],), i, dtype=torch.int64, device=known.device)
        for u in range(resample):
            step_noise = noise(u * _ROUND_KEY + t_key) if i > 0 else None
            if sampler == "ddpm":
                x_prev, _ = ddpm_step(model, schedule, x, i, noise=step_noise, **kwargs)
            else:
                x_prev, _ = ddim_step(model, schedule, x, i, eta=eta, noise=step_noise, **kwargs)
            abar_prev = extract(schedule.alphas_cumprod_prev, idx, known)
            fresh = noise(u * _ROUND_KEY + _REPLACE_KEY + t_key)
            known_prev = abar_prev.sqrt() * known + (1 - abar_prev).sqrt() * fresh
            x_prev = torch.where(mask, known_prev, x_prev)
            if u < resample - 1 and i > 0:  # RePaint: go back up one step, q(x_i | x_{i-1})
                beta = extract(schedule.betas, idx, known)
                x = (1 - beta).sqrt() * x_prev + beta.sqrt() * noise(u * _ROUND_KEY + _RENOISE_KEY + t_key)
            else:
                break
        x = x_prev
    return torch.where(mask, known, x)
