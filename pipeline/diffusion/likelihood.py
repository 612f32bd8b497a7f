"""Full-chain variational bound in bits/dim (DDPM eq. 5; Improved DDPM sec. 3 reports it this way)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .gaussian import check_x, p_mean_variance, q_mean_variance, q_sample
from .losses import normal_kl, vlb_term_bpd
from .samplers import _check_seeds, noise_from_seeds
from .schedules import Schedule

__all__ = ["VLBOutput", "prior_bpd", "vlb_bits_per_dim"]

Model = Callable[..., Tensor]


class VLBOutput(NamedTuple):
    """Per-example bits/dim: total = prior + sum of terms; terms[:, i] is L_i of schedule step i (L_0 = decoder NLL)."""

    total: Tensor
    prior: Tensor
    terms: Tensor


def prior_bpd(schedule: Schedule, x0: Tensor) -> Tensor:
    """L_T = KL(q(x_T | x_0) || N(0, I)) per example, mean over dims, in bits (DDPM eq. 5)."""
    t_last = torch.full((x0.shape[0],), schedule.num_timesteps - 1, dtype=torch.int64, device=x0.device)
    mean, _, logvar = q_mean_variance(schedule, x0, t_last)
    kl = normal_kl(mean, logvar, torch.zeros_like(mean), torch.zeros_like(logvar))
    return kl.mean(dim=tuple(range(1, x0.ndim))) / math.log(2.0)


@torch.no_grad()
def vlb_bits_per_dim(
    model: Model,
    schedule: Schedule,
    x0: Tensor,
    *,
    seeds: Sequence[int] | Tensor | None = None,
    y: Tensor | None = None,
    clip_denoised: bool = False,
    parameterization: str = "eps",
    variance: str = "fixed_small",
    progress: Callable[[int, int], None] | None = None,
    model_kwargs: dict[str, Any] | None = None,
) -> VLBOutput:
    """-log p(x_0) upper bound of data in [-1, 1]: L_T + sum_t L_{t-1} + L_0, one noise draw per term.

    With seeds, the noise of example b at step i is noise_from_seeds(seeds[b], ., t_i + 1), so an
    example's bound does not depend on its batch; without, torch's global generator is used.
    """
    check_x("x0", x0)
    s = None if seeds is None else _check_seeds(seeds, x0.shape[0])
    n = schedule.num_timesteps
    terms = torch.zeros(x0.shape[0], n, dtype=x0.dtype, device=x0.device)
    for k, i in enumerate(reversed(range(n))):
        t_index = torch.full((x0.shape[0],), i, dtype=torch.int64, device=x0.device)
        if s is None:
            noise = torch.randn_like(x0)
        else:
            noise = noise_from_seeds(s, x0.shape[1:], int(schedule.timestep_map[i]) + 1, dtype=x0.dtype, device=x0.device)
        x_t = q_sample(schedule, x0, t_index, noise)
        out = p_mean_variance(
            model, schedule, x_t, t_index, y,
            parameterization=parameterization, variance=variance, clip_denoised=clip_denoised, model_kwargs=model_kwargs,
        )
        terms[:, i] = vlb_term_bpd(schedule, x0, x_t, t_index, out.mean, out.log_variance)
        if progress is not None:
            progress(k + 1, n)
    prior = prior_bpd(schedule, x0)
    return VLBOutput(prior + terms.sum(dim=1), prior, terms)
