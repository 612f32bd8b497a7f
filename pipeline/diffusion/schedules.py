"""Discrete-time noise schedules (DDPM, Improved DDPM) and respacing (DDIM, Improved DDPM sec. 4).

A schedule is a frozen bundle of float64 tensors built from betas by `make_schedule`; nothing
about it must be called in a set order. Indices i run over the schedule's own steps
0..N-1; `timestep_map[i]` is the ORIGINAL timestep 0..T-1 of step i, which is what a model is
always called with (after respacing too).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "SCHEDULE_NAMES",
    "Schedule",
    "build_schedule",
    "cosine_alpha_bar",
    "cosine_betas",
    "linear_betas",
    "make_schedule",
    "respace",
    "space_timesteps",
]

SCHEDULE_NAMES = ("linear", "cosine")


@dataclass(frozen=True)
class Schedule:
    """All per-step coefficients of a discrete Gaussian diffusion, float64, shape (N,)."""

    betas: Tensor
    alphas: Tensor
    alphas_cumprod: Tensor
    alphas_cumprod_prev: Tensor
    alphas_cumprod_next: Tensor
    sqrt_alphas_cumprod: Tensor
    sqrt_one_minus_alphas_cumprod: Tensor
    sqrt_recip_alphas_cumprod: Tensor
    sqrt_recipm1_alphas_cumprod: Tensor
    posterior_variance: Tensor
    posterior_log_variance_clipped: Tensor
    posterior_mean_coef1: Tensor
    posterior_mean_coef2: Tensor
    timestep_map: Tensor  # (N,) int64 original timesteps of the kept steps

    @property
    def num_timesteps(self) -> int:
        return int(self.betas.shape[0])


def linear_betas(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """DDPM sec. 4: betas linear from 1e-4 to 0.02 at T=1000, scaled by 1000/T for other T (Improved DDPM)."""
    _check_T(num_timesteps)
    scale = 1000.0 / num_timesteps
    if scale * beta_end >= 1:
        raise ValueError(
            f"num_timesteps: {num_timesteps} is not allowed for linear betas up to {beta_end} at T=1000 "
            f"(scaled by 1000/T they reach 1); expected T > {math.floor(1000 * beta_end)}"
        )
    return torch.linspace(scale * beta_start, scale * beta_end, num_timesteps, dtype=torch.float64)


def cosine_alpha_bar(t: Tensor, s: float = 0.008) -> Tensor:
    """Improved DDPM eq. 17 without normalisation: f(t) = cos^2(((t/T) + s) / (1 + s) * pi / 2), t in [0, 1]."""
    return torch.cos((t.to(torch.float64) + s) / (1 + s) * math.pi / 2) ** 2


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Improved DDPM eq. 17: beta_t = 1 - abar_t / abar_{t-1}, abar_t = f(t)/f(0), clipped at max_beta."""
    _check_T(num_timesteps)
    if not 0 < max_beta < 1:
        raise ValueError(f"max_beta: {max_beta!r} is not allowed; expected 0 < max_beta < 1")
    grid = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    f = cosine_alpha_bar(grid, s)
    return torch.clamp(1 - f[1:] / f[:-1], max=max_beta)


def make_schedule(betas: Tensor | Sequence[float], timestep_map: Tensor | Sequence[int] | None = None) -> Schedule:
    """Every coefficient used by the forward process, the posterior and the samplers (DDPM eqs. 4, 6, 7)."""
    b = torch.as_tensor(betas, dtype=torch.float64).clone()
    if b.ndim != 1 or b.numel() == 0:
        raise ValueError(f"betas: shape {tuple(b.shape)} is not allowed; expected a non-empty 1-D tensor")
    if not ((b > 0) & (b <= 1)).all():
        raise ValueError(f"betas: values in [{b.min().item()}, {b.max().item()}] are not allowed; expected 0 < beta <= 1")
    n = b.shape[0]
    tmap = torch.arange(n) if timestep_map is None else torch.as_tensor(timestep_map, dtype=torch.int64).clone()
    if tmap.shape != (n,) or (tmap[1:] <= tmap[:-1]).any() or tmap[0] < 0:
        raise ValueError(f"timestep_map: {tmap.tolist()} is not allowed; expected {n} increasing non-negative ints")
    return _coefficients(b, torch.cumprod(1 - b, 0), tmap)


def _coefficients(b: Tensor, abar: Tensor, tmap: Tensor) -> Schedule:
    alphas = 1 - b
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    abar_next = torch.cat([abar[1:], torch.zeros(1, dtype=torch.float64)])
    post_var = b * (1 - abar_prev) / (1 - abar)  # DDPM eq. 7: beta-tilde
    # log beta-tilde with the t=0 entry (which is 0) replaced by the t=1 entry, as Improved DDPM
    post_logvar = torch.log(torch.cat([post_var[1:2], post_var[1:]])) if b.numel() > 1 else torch.log(b)
    return Schedule(
        betas=b,
        alphas=alphas,
        alphas_cumprod=abar,
        alphas_cumprod_prev=abar_prev,
        alphas_cumprod_next=abar_next,
        sqrt_alphas_cumprod=abar.sqrt(),
        sqrt_one_minus_alphas_cumprod=(1 - abar).sqrt(),
        sqrt_recip_alphas_cumprod=(1 / abar).sqrt(),
        sqrt_recipm1_alphas_cumprod=(1 / abar - 1).sqrt(),
        posterior_variance=post_var,
        posterior_log_variance_clipped=post_logvar,
        posterior_mean_coef1=b * abar_prev.sqrt() / (1 - abar),  # DDPM eq. 7, coefficient of x_0
        posterior_mean_coef2=(1 - abar_prev) * alphas.sqrt() / (1 - abar),  # DDPM eq. 7, coefficient of x_t
        timestep_map=tmap,
    )


def build_schedule(name: str, num_timesteps: int = 1000) -> Schedule:
    """A schedule by name: 'linear' (DDPM) or 'cosine' (Improved DDPM)."""
    if name == "linear":
        return make_schedule(linear_betas(num_timesteps))
    if name == "cosine":
        return make_schedule(cosine_betas(num_timesteps))
    raise ValueError(f"schedule name: {name!r} is not allowed; expected one of {', '.join(map(repr, SCHEDULE_NAMES))}")


def space_timesteps(num_timesteps: int, spec: str | int | Sequence[int]) -> list[int]:
    """Which of 0..T-1 to keep.

    'ddimN': DDIM's even stride (0, c, 2c, ...) with the integer stride c giving exactly N steps,
    or, if no integer stride gives N, N steps rounded from an even grid over [0, T-1].
    'a,b,c' or [a, b, c]: Improved DDPM sec. 4: split 0..T-1 into equal sections and take a, b, c
    evenly spaced steps (ends included) from each. An int N means one section of N steps.
    """
    _check_T(num_timesteps)
    if isinstance(spec, str) and spec.startswith("ddim"):
        try:
            n = int(spec[4:])
        except ValueError:
            raise ValueError(f"spec: {spec!r} is not allowed; expected 'ddimN' with an integer N") from None
        _check_count("spec", spec, n, num_timesteps)
        for stride in range(1, num_timesteps + 1):
            if len(range(0, num_timesteps, stride)) == n:
                return list(range(0, num_timesteps, stride))
        return sorted({round(v) for v in torch.linspace(0, num_timesteps - 1, n, dtype=torch.float64).tolist()})
    if isinstance(spec, bool):
        raise ValueError(f"spec: {spec!r} is not allowed; expected 'ddimN', 'a,b,c', an int or a list of ints")
    if isinstance(spec, int):
        counts = [spec]
    elif isinstance(spec, str):
        try:
            counts = [int(p) for p in spec.split(",")]
        except ValueError:
            raise ValueError(f"spec: {spec!r} is not allowed; expected 'ddimN', 'a,b,c', an int or a list of ints") from None
    else:
        counts = [int(c) for c in spec]
    if not counts or len(counts) > num_timesteps:
        raise ValueError(f"spec: {spec!r} is not allowed; expected between 1 and {num_timesteps} sections")
    base, extra = divmod(num_timesteps, len(counts))
    kept: list[int] = []
    start = 0
    for k, count in enumerate(counts):
        size = base + (1 if k < extra else 0)
        _check_count("spec", spec, count, size)
        if count == 1:
            kept.append(start)
        else:
            kept += [start + round(j * (size - 1) / (count - 1)) for j in range(count)]
        start += size
    return kept


def respace(schedule: Schedule, spec: str | int | Sequence[int]) -> Schedule:
    """Keep a subset of steps, recomputing betas so abar at every kept step is unchanged (Improved DDPM sec. 4)."""
    kept = torch.tensor(space_timesteps(schedule.num_timesteps, spec), dtype=torch.int64)
    abar = schedule.alphas_cumprod[kept]
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    betas = 1 - abar / abar_prev  # beta_i = 1 - abar_{t_i} / abar_{t_{i-1}}
    return _coefficients(betas, abar.clone(), schedule.timestep_map[kept])  # abar kept exactly, not re-multiplied


def _check_T(num_timesteps: int) -> None:
    if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int) or num_timesteps < 1:
        raise ValueError(f"num_timesteps: {num_timesteps!r} is not allowed; expected an int >= 1")


def _check_count(name: str, spec: object, count: int, available: int) -> None:
    if not 1 <= count <= available:
        raise ValueError(f"{name}: {spec!r} is not allowed; a section of {available} steps can keep 1..{available}")
