"""Training losses (DDPM L_simple, Improved DDPM L_vlb and L_hybrid) and importance sampling of t.

Every loss is per example (B,); the training loop weights and reduces. VLB terms are in bits
per dimension (the mean over dims), as Improved DDPM reports them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .gaussian import (
    PARAMETERIZATIONS,
    VARIANCES,
    check_choice,
    check_same_shape,
    check_t_index,
    check_x,
    extract,
    model_timesteps,
    output_from_x0_eps,
    p_mean_variance_from_output,
    q_posterior_mean_variance,
    q_sample,
    split_output,
)
from .schedules import Schedule

__all__ = [
    "LOSS_TYPES",
    "ImportanceSampler",
    "LossOutput",
    "discretized_gaussian_log_likelihood",
    "normal_kl",
    "training_losses",
    "vlb_term_bpd",
]

LOSS_TYPES = ("simple", "hybrid", "vlb")
Model = Callable[..., Tensor]


class LossOutput(NamedTuple):
    """Per-example (B,) tensors: the loss to minimise, the MSE on the target, the VLB term L_t in bits/dim."""

    loss: Tensor
    mse: Tensor
    vlb: Tensor


def _mean_flat(x: Tensor) -> Tensor:
    return x.mean(dim=tuple(range(1, x.ndim)))


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor, num_bins: int = 256) -> Tensor:
    """DDPM sec. 3.3 eq. 13: log P(x) of data in [-1, 1] under N(mean, e^{2 log_scale}) integrated over its bin.

    Bins have width 2/(num_bins-1); the first and last extend to -inf and +inf. Elementwise, in nats.
    """
    half = 1.0 / (num_bins - 1)
    inv = torch.exp(-log_scale)
    lo, hi = (x - mean - half) * inv, (x - mean + half) * inv
    # difference of CDFs taken on the side of the mean where it does not cancel
    mid = torch.where(x - mean > 0, torch.special.ndtr(-lo) - torch.special.ndtr(-hi), torch.special.ndtr(hi) - torch.special.ndtr(lo))
    log_mid = torch.log(mid.clamp(min=1e-12))
    edge = 1 - half  # data at the first/last bin centre
    return torch.where(x < -edge, torch.special.log_ndtr(hi), torch.where(x > edge, torch.special.log_ndtr(-lo), log_mid))


def vlb_term_bpd(
    schedule: Schedule, x0: Tensor, x_t: Tensor, t_index: Tensor, mean: Tensor, log_variance: Tensor
) -> Tensor:
    """L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0 and L_0 = -log p(x_0 | x_1) at t = 0.

    DDPM eq. 5; per example, mean over dims, in bits.
    """
    true_mean, _, true_logvar = q_posterior_mean_variance(schedule, x0, x_t, t_index)
    kl = _mean_flat(normal_kl(true_mean, true_logvar, mean, log_variance)) / math.log(2.0)
    nll = -_mean_flat(discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_variance)) / math.log(2.0)
    return torch.where(t_index == 0, nll, kl)


def training_losses(
    model: Model,
    schedule: Schedule,
    x0: Tensor,
    t: Tensor,
    noise: Tensor | None = None,
    y: Tensor | None = None,
    *,
    parameterization: str = "eps",
    variance: str = "fixed_small",
    loss_type: str = "simple",
    vlb_weight: float = 0.001,
    model_kwargs: dict[str, Any] | None = None,
) -> LossOutput:
    """Per-example losses at schedule steps t (B,) for data x0 in [-1, 1].

    simple: DDPM eq. 14, MSE on the target of `parameterization`.
    vlb:    N * L_t, an unbiased estimate of L_vlb (Improved DDPM eq. 4-5) under uniform t; multiply
            by ImportanceSampler weights for importance-sampled t (Improved DDPM sec. 3.3).
    hybrid: L_simple + vlb_weight * N * L_t with the mean stopped in L_t (Improved DDPM sec. 3.1), so the
            VLB term trains only the learned variance.
    """
    check_x("x0", x0)
    check_t_index(t, schedule, x0.shape[0])
    check_choice("parameterization", parameterization, PARAMETERIZATIONS)
    check_choice("variance", variance, VARIANCES)
    check_choice("loss_type", loss_type, LOSS_TYPES)
    if not vlb_weight >= 0:
        raise ValueError(f"vlb_weight: {vlb_weight!r} is not allowed; expected a number >= 0")
    if noise is None:
        noise = torch.randn_like(x0)
    check_same_shape("noise", noise, x0)
    x_t = q_sample(schedule, x0, t, noise)
    out = model(x_t, model_timesteps(schedule, t), y=y, **(model_kwargs or {}))
    pred, v = split_output(out, x_t, variance)
    alpha = extract(schedule.sqrt_alphas_cumprod, t, x0)
    sigma = extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0)
    target = output_from_x0_eps(x0, noise, alpha, sigma, parameterization)
    mse = _mean_flat((target - pred) ** 2)

    if loss_type == "hybrid":
        frozen = pred.detach() if v is None else torch.cat([pred.detach(), v], dim=1)  # stop-gradient on the mean
    else:
        frozen = out
    with torch.set_grad_enabled(torch.is_grad_enabled() and loss_type != "simple"):
        p = p_mean_variance_from_output(frozen, schedule, x_t, t, parameterization=parameterization, variance=variance)
        vlb = vlb_term_bpd(schedule, x0, x_t, t, p.mean, p.log_variance)
    n = schedule.num_timesteps
    if loss_type == "simple":
        loss = mse
    elif loss_type == "hybrid":
        loss = mse + vlb_weight * n * vlb
    else:
        loss = n * vlb
    return LossOutput(loss, mse, vlb)


class ImportanceSampler:
    """Improved DDPM sec. 3.3: p_t proportional to sqrt(E[L_t^2]) over the last `history` losses of each t.

    Uniform until every t has `history` losses; then mixed with `uniform_prob` of uniform. sample()
    returns t and weights 1 / (N p_t), so mean(weights * loss) estimates the uniform-t mean.
    Multi-process: all-gather (t, losses) from every rank in rank order and call update() with the
    concatenation on every rank; the state stays identical everywhere.
    """

    def __init__(self, num_timesteps: int, history: int = 10, uniform_prob: float = 1e-3) -> None:
        if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int) or num_timesteps < 1:
            raise ValueError(f"num_timesteps: {num_timesteps!r} is not allowed; expected an int >= 1")
        if isinstance(history, bool) or not isinstance(history, int) or history < 1:
            raise ValueError(f"history: {history!r} is not allowed; expected an int >= 1")
        if not 0 <= uniform_prob <= 1:
            raise ValueError(f"uniform_prob: {uniform_prob!r} is not allowed; expected a number in [0, 1]")
        self.num_timesteps, self.history, self.uniform_prob = num_timesteps, history, uniform_prob
        self._losses = torch.zeros(num_timesteps, history, dtype=torch.float64)
        self._counts = torch.zeros(num_timesteps, dtype=torch.int64)

    @property
    def warm(self) -> bool:
        return bool((self._counts == self.history).all())

    def probabilities(self) -> Tensor:
        n = self.num_timesteps
        uniform = torch.full((n,), 1.0 / n, dtype=torch.float64)
        if not self.warm:
            return uniform
        w = torch.sqrt((self._losses**2).mean(dim=1))
        if not torch.isfinite(w).all() or w.sum() <= 0:
            return uniform
        return (1 - self.uniform_prob) * w / w.sum() + self.uniform_prob * uniform

    def sample(self, batch: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        p = self.probabilities()
        t = torch.multinomial(p, batch, replacement=True, generator=generator)
        return t, (1.0 / (self.num_timesteps * p[t])).to(torch.float32)

    def update(self, t: Tensor, losses: Tensor) -> None:
        t = torch.as_tensor(t).detach().cpu().reshape(-1)
        losses = torch.as_tensor(losses).detach().cpu().to(torch.float64).reshape(-1)
        if t.shape != losses.shape:
            raise ValueError(f"losses: shape {tuple(losses.shape)} is not allowed; expected the shape of t {tuple(t.shape)}")
        if t.numel() and (t.min() < 0 or t.max() >= self.num_timesteps):
            raise ValueError(f"t: values {t.tolist()} are not allowed; expected 0..{self.num_timesteps - 1}")
        if not t.numel():
            return
        # append the new losses of each t in order after its valid history, then keep the last `history`
        order = torch.sort(t, stable=True).indices
        t_sorted, l_sorted = t[order], losses[order]
        new_counts = torch.bincount(t_sorted, minlength=self.num_timesteps)
        first = torch.cumsum(new_counts, 0) - new_counts
        rank = torch.arange(t_sorted.numel()) - first[t_sorted]
        width = self.history + int(new_counts.max())
        buf = torch.zeros(self.num_timesteps, width, dtype=torch.float64)
        buf[:, : self.history] = self._losses
        buf[t_sorted, self._counts[t_sorted] + rank] = l_sorted
        total = self._counts + new_counts
        kept = total.clamp(max=self.history)
        cols = (total - kept)[:, None] + torch.arange(self.history)[None]
        self._losses = torch.gather(buf, 1, cols.clamp(max=width - 1)) * (torch.arange(self.history)[None] < kept[:, None])
        self._counts = kept

    def state_dict(self) -> dict[str, Any]:
        return {
            "num_timesteps": self.num_timesteps,
            "history": self.history,
            "uniform_prob": self.uniform_prob,
            "losses": self._losses.tolist(),
            "counts": self._counts.tolist(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("num_timesteps", "history"):
            if state.get(key) != getattr(self, key):
                raise ValueError(f"state[{key!r}]: {state.get(key)!r} is not allowed; this sampler has {getattr(self, key)}")
        self.uniform_prob = float(state["uniform_prob"])
        self._losses = torch.tensor(state["losses"], dtype=torch.float64).reshape(self.num_timesteps, self.history)
        self._counts = torch.tensor(state["counts"], dtype=torch.int64).reshape(self.num_timesteps)
