"""CLIP score of generated images, prompt ranking, and the unCLIP prior's baselines: pure functions of embeddings.

All inputs are CLIP embeddings (``pipeline.data.clip_embed.Embedder``: L2-normalised float32
``[N, d]``); they are normalised again here, so any scale is accepted. Intervals are percentile
bootstraps over the N pairs (``evaluation.bootstrap``: same counts, same seed -> same interval).

- :func:`clip_score`: mean over pairs of cos(image_i, prompt_i) (the cosine itself, in [-1, 1]).
  Hessel et al. 2021 report ``2.5 * max(cos, 0)`` and torchmetrics ``100 * max(cos, 0)``; with a
  model of our own the raw cosine says more, and both are a fixed map of it when cos > 0.
- :func:`prompt_top1`: how often an image generated for prompt p has p as its nearest prompt among
  the P prompts (chance 1/P), the test that "the image shows the prompt's class".
- :func:`prior_baselines`: unCLIP's prior (DALL-E 2 section 2.2) is judged by cos(sampled image
  embedding, true image embedding) on held-out pairs, beside two baselines that need no prior: the
  caption's text embedding itself, and the mean image embedding of the training data.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from evaluation.bootstrap import Interval, bootstrap_counts, percentile_interval

__all__ = ["clip_score", "paired_cosines", "prior_baselines", "prompt_top1"]


def paired_cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """cos(a_i, b_i) for rows i of two ``[N, d]`` tensors (``b`` may be one ``[d]`` vector for all rows)."""
    a = torch.as_tensor(a, dtype=torch.float64)
    b = torch.as_tensor(b, dtype=torch.float64)
    if b.ndim == 1:
        b = b.expand_as(a)
    if a.ndim != 2 or a.shape != b.shape or a.shape[0] == 0:
        raise ValueError(f"embeddings: shapes {tuple(a.shape)} and {tuple(b.shape)} are not allowed; give two [N, d] "
                         "tensors with N >= 1 rows paired by index")
    return (F.normalize(a, dim=-1) * F.normalize(b, dim=-1)).sum(-1)


def _mean_with_interval(values: np.ndarray, counts: np.ndarray, level: float, resamples: int,
                        seed: int) -> dict[str, Any]:
    boot = counts @ values / values.shape[0]  # resample b's mean: sum_i counts[b, i] values_i / N
    low, high = percentile_interval(boot, level)
    return {"value": float(values.mean()), "interval": Interval(low, high, level, resamples, seed).as_dict()}


def clip_score(image_emb: torch.Tensor, text_emb: torch.Tensor, *, resamples: int = 1000, level: float = 0.95,
               seed: int = 0) -> dict[str, Any]:
    """Mean cos(image_i, prompt_i) over N generated images and their prompts, with a bootstrap interval."""
    cos = paired_cosines(image_emb, text_emb).numpy()
    counts = bootstrap_counts(len(cos), resamples, seed)
    return {"clip_score": _mean_with_interval(cos, counts, level, resamples, seed), "n": len(cos)}


def prompt_top1(image_emb: torch.Tensor, prompt_emb: torch.Tensor, prompt_index: torch.Tensor) -> dict[str, float]:
    """Fraction of images whose nearest prompt (cosine, among the P rows of ``prompt_emb``) is the one they
    were generated for (``prompt_index[i]``); ``chance`` = 1/P, ``sd_at_chance`` = sqrt(p(1-p)/N)."""
    img = F.normalize(torch.as_tensor(image_emb, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.as_tensor(prompt_emb, dtype=torch.float64), dim=-1)
    idx = torch.as_tensor(prompt_index, dtype=torch.int64)
    if img.ndim != 2 or txt.ndim != 2 or img.shape[1] != txt.shape[1] or idx.shape != (img.shape[0],):
        raise ValueError(f"shapes: images {tuple(img.shape)}, prompts {tuple(txt.shape)}, prompt_index "
                         f"{tuple(idx.shape)} are not allowed; give [N, d], [P, d] and [N]")
    if len(idx) and (idx.min() < 0 or idx.max() >= txt.shape[0]):
        raise ValueError(f"prompt_index: values must lie in 0..{txt.shape[0] - 1}")
    hits = ((img @ txt.T).argmax(dim=1) == idx).double()
    p = 1.0 / txt.shape[0]
    return {"top1": float(hits.mean()), "n": float(len(idx)), "chance": p,
            "sd_at_chance": float(np.sqrt(p * (1 - p) / max(len(idx), 1)))}


def prior_baselines(sampled: torch.Tensor, text: torch.Tensor, image: torch.Tensor, mean_image: torch.Tensor,
                    *, resamples: int = 1000, level: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """cos(x, true image embedding) on N held-out pairs for x = the prior's sample (``prior``), the
    caption's text embedding (``text``), and ``mean_image`` (the mean image embedding of the
    training data, ``mean_image``); each a mean with a bootstrap interval, plus the paired
    differences ``prior - text`` and ``prior - mean_image`` (same resamples, so their intervals say
    whether the prior beats a baseline)."""
    sampled = torch.as_tensor(sampled)
    mean_image = torch.as_tensor(mean_image)
    if mean_image.ndim != 1 or mean_image.shape[0] != sampled.shape[-1]:
        raise ValueError(f"mean_image: shape {tuple(mean_image.shape)} is not allowed; give one [d] vector, "
                         f"d = {sampled.shape[-1]}")
    cos = {
        "prior": paired_cosines(sampled, image).numpy(),
        "text": paired_cosines(text, image).numpy(),
        "mean_image": paired_cosines(image, mean_image).numpy(),
    }
    counts = bootstrap_counts(len(cos["prior"]), resamples, seed)
    out: dict[str, Any] = {k: _mean_with_interval(v, counts, level, resamples, seed) for k, v in cos.items()}
    for base in ("text", "mean_image"):
        out[f"prior_minus_{base}"] = _mean_with_interval(cos["prior"] - cos[base], counts, level, resamples, seed)
    out["n"] = len(cos["prior"])
    return out
