"""Noise-conditional score networks (Song & Ermon, NeurIPS 2019).

Geometric noise levels sigma_1 > ... > sigma_L, one score network s(x, sigma) trained by
denoising score matching weighted by lambda(sigma) = sigma^2 (eq. 5-6), sampled by annealed
Langevin dynamics with step eps * sigma_i^2 / sigma_L^2 (Algorithm 1) and a final denoising
step x + sigma_L^2 s(x, sigma_L) (Tweedie; Jolicoeur-Martineau et al. 2021, Song & Ermon 2020);
inpainting with annealed Langevin (Algorithm 2 of the paper's appendix).

The network is called as ``model(x, log(sigma), y)`` and predicts eps (the score is
-output / sigma: NCSNv2's s(x, sigma) = s(x) / sigma) or, with ``parameterization='score'``,
the score itself. The sampling interface is ``score_fn(x, sigma) -> score`` with sigma (B,).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from pipeline.diffusion.objectives import PerExampleObjective

from pipeline.diffusion.sde import make_noise_fn

__all__ = [
    "NCSNObjective",
    "annealed_langevin_sample",
    "ncsn_loss",
    "ncsn_noise_input",
    "ncsn_sigmas",
    "score_fn_from_ncsn_model",
]

SigmaScoreFn = Callable[[Tensor, Tensor], Tensor]


def _col(v: Tensor, x: Tensor) -> Tensor:
    return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


def ncsn_sigmas(sigma_max: float, sigma_min: float, num_scales: int) -> Tensor:
    """Geometric sequence sigma_1 = sigma_max > ... > sigma_L = sigma_min (Sec. 4.2), float64."""
    if not 0 < sigma_min < sigma_max or num_scales < 2:
        raise ValueError(
            f"sigma_max/sigma_min/num_scales: ({sigma_max}, {sigma_min}, {num_scales}) not allowed; "
            "need 0 < sigma_min < sigma_max and num_scales >= 2"
        )
    return torch.exp(torch.linspace(math.log(sigma_max), math.log(sigma_min), num_scales, dtype=torch.float64))


def ncsn_noise_input(sigma: Tensor) -> Tensor:
    """The conditioning input of an NCSN network: log sigma."""
    return torch.log(sigma)


def score_fn_from_ncsn_model(model, parameterization: str = "eps", y: Tensor | None = None) -> SigmaScoreFn:
    """Adapt ``model(x, log sigma, y)`` to ``score_fn(x, sigma)``."""
    if parameterization not in ("eps", "score"):
        raise ValueError(f"parameterization: {parameterization!r} is not allowed; expected 'eps' or 'score'")

    def score_fn(x: Tensor, sigma: Tensor) -> Tensor:
        out = model(x, ncsn_noise_input(sigma), y)
        return out if parameterization == "score" else -out / _col(sigma, x)

    return score_fn


def ncsn_loss(score_fn: SigmaScoreFn, x0: Tensor, sigmas: Tensor, *, generator=None) -> Tensor:
    """Per-example 1/2 sigma^2 ||s(x~, sigma) + (x~ - x) / sigma^2||^2, sigma uniform over the levels (eq. 6)."""
    b = x0.shape[0]
    idx = torch.randint(0, len(sigmas), (b,), generator=generator, device=x0.device)
    sigma = sigmas.to(device=x0.device, dtype=x0.dtype)[idx]
    z = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
    s = _col(sigma, x0)
    score = score_fn(x0 + s * z, sigma)
    return 0.5 * ((s * score + z) ** 2).reshape(b, -1).sum(-1)  # lambda(sigma) = sigma^2


class NCSNObjective(PerExampleObjective, nn.Module):
    """Training objective ``loss(model, x0, y=None, *, generator) -> (B,)`` for NCSN."""

    def __init__(self, sigmas: Tensor, *, parameterization: str = "eps") -> None:
        super().__init__()
        if parameterization not in ("eps", "score"):
            raise ValueError(f"parameterization: {parameterization!r} is not allowed; expected 'eps' or 'score'")
        self.register_buffer("sigmas", torch.as_tensor(sigmas, dtype=torch.float64), persistent=False)
        self.parameterization = parameterization

    def forward(self, model, x0: Tensor, y: Tensor | None = None, *, generator=None) -> Tensor:
        score_fn = score_fn_from_ncsn_model(model, self.parameterization, y)
        return ncsn_loss(score_fn, x0, self.sigmas, generator=generator)

    def score_fn(self, model, y: Tensor | None = None) -> SigmaScoreFn:
        return score_fn_from_ncsn_model(model, self.parameterization, y)


def annealed_langevin_sample(
    score_fn: SigmaScoreFn,
    sigmas: Tensor,
    x_init: Tensor,
    *,
    steps_per_level: int = 100,
    step_lr: float = 2e-5,
    denoise: bool = True,
    known: Tensor | None = None,
    mask: Tensor | None = None,
    seeds=None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Annealed Langevin dynamics (Algorithm 1); inpainting (Algorithm 2) with ``known``/``mask``.

    At level i: alpha_i = step_lr * sigma_i^2 / sigma_L^2 and ``steps_per_level`` updates
    x <- x + alpha_i / 2 s(x, sigma_i) + sqrt(alpha_i) z. For inpainting, after every update the
    known coordinates (``mask`` True) are set to y + sigma_i z' with z' drawn once per level.
    ``denoise`` adds the final step x + sigma_L^2 s(x, sigma_L). Noise from per-sample ``seeds``
    (batch-independent) or ``generator``.
    """
    if (known is None) != (mask is None):
        raise ValueError("known/mask: give both for inpainting, or neither")
    if steps_per_level < 1 or step_lr <= 0:
        raise ValueError(f"steps_per_level/step_lr: ({steps_per_level}, {step_lr}) not allowed; need >= 1 and > 0")
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    noise_fn = make_noise_fn(seeds=seeds, generator=generator)
    x = x_init
    if mask is not None:
        mask = mask.to(torch.bool).expand_as(x)
    sigma_last = float(sigmas[-1])
    for level, sigma_i in enumerate(sigmas.tolist()):
        alpha = step_lr * (sigma_i / sigma_last) ** 2
        sigma = torch.full((x.shape[0],), sigma_i, dtype=x.dtype, device=x.device)
        if known is not None:
            y_noisy = known + sigma_i * noise_fn(x, (1 << 40) + level)
            x = torch.where(mask, y_noisy, x)
        for j in range(steps_per_level):
            x = x + 0.5 * alpha * score_fn(x, sigma) + math.sqrt(alpha) * noise_fn(x, (level << 20) + j + 1)
            if known is not None:
                x = torch.where(mask, y_noisy, x)
    if denoise:
        sigma = torch.full((x.shape[0],), sigma_last, dtype=x.dtype, device=x.device)
        x = x + sigma_last**2 * score_fn(x, sigma)  # Tweedie's E[x | x~]
    if known is not None:
        x = torch.where(mask, known, x)
    return x
