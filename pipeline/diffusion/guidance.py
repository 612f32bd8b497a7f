"""Guidance: classifier guidance (Dhariwal & Nichol 2021) and classifier-free guidance (Ho & Salimans 2022).

Classifier guidance produces ``cond_fn(x, t, y) = s * grad_x log p_phi(y | x_t, t)`` for the
discrete samplers (``ddpm_sample``/``ddim_sample`` add it to the mean / subtract it from eps),
and :func:`classifier_guided_score_fn` adds it to a continuous-time score. The classifier is
called as ``classifier(x_t, t) -> logits (B, K)`` with the same ``t`` input as the diffusion
model (discrete: original timestep; SDE: ``sde.noise_input(t)``).

Classifier-free guidance: one network trained with labels dropped to a null class
(:func:`drop_labels`; the null class is the extra label index ``num_classes``, so the label
embedding has ``num_classes + 1`` rows) is combined at sampling time as
eps~ = (1 + w) eps(x, y) - w eps(x, null): w = 0 is the conditional model, w = -1 the
unconditional one; in the "s = 1 + w" convention of later papers s = 1 is conditional.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "classifier_cond_fn",
    "classifier_free_guidance",
    "classifier_guided_score_fn",
    "drop_labels",
    "oracle_classifier",
]

CondFn = Callable[[Tensor, Tensor, Tensor | None], Tensor]


def classifier_cond_fn(classifier: Callable[..., Tensor], scale: float = 1.0) -> CondFn:
    """cond_fn(x, t, y) = scale * grad_x log softmax(classifier(x, t))[y] (ADM Algorithms 1-2)."""
    if scale < 0:
        raise ValueError(f"scale: {scale!r} is not allowed; expected scale >= 0")

    def cond_fn(x: Tensor, t: Tensor, y: Tensor | None) -> Tensor:
        if y is None:
            raise ValueError("y: None is not allowed for classifier guidance; pass the target class labels")
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            log_probs = torch.log_softmax(classifier(x_in, t), dim=-1)
            selected = log_probs.gather(1, y.long().reshape(-1, 1)).sum()
            (grad,) = torch.autograd.grad(selected, x_in)
        return scale * grad

    return cond_fn


def classifier_guided_score_fn(score_fn, cond_fn: CondFn, y: Tensor, t_input: Callable[[Tensor], Tensor]):
    """score(x, t) + cond_fn(x, t_input(t), y): the score of p_t(x) p_t(y | x)^s
    (Song et al. 2021, controllable generation)."""

    def guided(x: Tensor, t: Tensor) -> Tensor:
        return score_fn(x, t) + cond_fn(x, t_input(t), y).to(x.dtype)

    return guided


def classifier_free_guidance(model: Callable[..., Tensor], guidance_scale: float, null_class: int):
    """A model(x, t, y) returning (1 + w) out(x, t, y) - w out(x, t, null) (Ho & Salimans eq. 6).

    Works for eps, x0, v and score outputs alike (the weights sum to one). A learned-variance model
    (2C output channels) keeps the conditional variance channels. y=None returns the plain model.
    """
    w = float(guidance_scale)

    def guided(x: Tensor, t: Tensor, y: Tensor | None = None, **cond: Any) -> Tensor:
        if y is None or w == 0.0:
            return model(x, t, y, **cond)
        null = torch.full_like(y, null_class)
        both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]), **cond)
        out_c, out_u = both.chunk(2)
        c = x.shape[1]
        mixed = (1 + w) * out_c[:, :c] - w * out_u[:, :c]
        return torch.cat([mixed, out_c[:, c:]], dim=1) if out_c.shape[1] > c else mixed

    return guided


def drop_labels(y: Tensor, p: float, null_class: int, *, generator: torch.Generator | None = None) -> Tensor:
    """Replace each label by ``null_class`` with probability p (CFG training, Ho & Salimans Algorithm 1)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p: {p!r} is not allowed; expected 0 <= p <= 1")
    drop = torch.rand(y.shape, generator=generator, device=y.device) < p
    return torch.where(drop, torch.full_like(y, null_class), y)


def oracle_classifier(mixture, alpha_sigma: Callable[[Tensor], tuple[Tensor, Tensor]]):
    """The exact noisy classifier of a GaussianMixture as ``classifier(x, t) -> log p(k | x_t)``.

    ``alpha_sigma(t)`` maps the model's t input to (alpha, sigma) of x_t = alpha x0 + sigma eps
    (discrete: from the schedule at the original timestep; SDE: from ``sde.marginal``).
    """

    def classifier(x: Tensor, t: Tensor) -> Tensor:
        alpha, sigma = alpha_sigma(t)
        return mixture.class_log_posterior(x, alpha, sigma)

    return classifier
