"""unCLIP (DALL-E 2, Ramesh et al. 2022): a diffusion prior over CLIP image embeddings and an
embedding-conditioned decoder.

Prior (sec. 2.2). A diffusion model of the CLIP image embedding z_i given the caption's CLIP text
embedding z_t. The network (:class:`pipeline.models.prior.PriorTransformer`) predicts the clean
embedding directly (x0-parameterisation, "we find it better to train our model to predict the
unnoised z_i directly, and use a mean-squared error loss on this prediction"), on the cosine
schedule with 1000 steps (Table 3). The unit-norm embeddings are multiplied by sqrt(d) before they
are noised, so that each coordinate has unit variance like the data diffusion is tuned for
(DALLE2-pytorch issue 60; without it the signal is lost at far smaller t than the schedule
expects), and divided by sqrt(d) after sampling. The text embedding is replaced by a learned null
embedding with probability 0.1 in training (sec. 2.2: classifier-free guidance for the prior). At
sampling, two candidates are drawn per caption and the one with the higher dot product with z_t
is kept (sec. 2.2).

Decoder (sec. 2.1). The image diffusion model (the DDPM family of
:class:`~pipeline.diffusion.objectives.DDPMObjective`, reused as is) with the U-Net conditioned on
z_i: projected and added to the timestep embedding, and projected into four extra context tokens
that every attention layer attends to (``UNet(cond_embed_dim=d, cond_tokens=4)``). z_i is set to
zero with probability 0.1 in training, which the U-Net treats exactly as "no embedding" (its
``emb=None``), so the unconditional model of classifier-free guidance is the network at
``emb=None``. DALL-E 2 also drops the caption's text-encoder tokens with probability 0.5; this
decoder has no text encoder (it is conditioned on the CLIP image embedding alone), so there is
nothing to drop.

Guidance (Ho & Salimans 2022, eq. 6) on an embedding: out~ = (1 + w) out(x, z) - w out(x, null);
w = 0 is the conditional model, w = -1 the unconditional one, exactly (two separate network calls,
not one batch of 2B, so the identities hold bit for bit).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .objectives import DDPMObjective, ObjectiveLoss
from .representation import with_code

__all__ = ["CLIP_IMAGE", "CLIP_TEXT", "UnclipDecoderObjective", "UnclipPriorObjective", "embedding_guidance",
           "embedding_scale", "keep_mask", "scale_embedding", "select_by_text_similarity", "unscale_embedding",
           "with_text"]

# The names of the per-sample CLIP embeddings in a batch's extras (data.fields).
CLIP_IMAGE = "clip_img"
CLIP_TEXT = "clip_txt"


def embedding_scale(dim: int) -> float:
    """sqrt(d): the factor that gives a unit-norm d-dimensional embedding unit variance per coordinate."""
    return math.sqrt(dim)


def scale_embedding(z: Tensor) -> Tensor:
    """z sqrt(d) (DALLE2-pytorch issue 60): the prior's diffusion runs on unit-variance coordinates."""
    return z * embedding_scale(z.shape[-1])


def unscale_embedding(x: Tensor) -> Tensor:
    """x / sqrt(d): a sampled (scaled) embedding back in CLIP units."""
    return x / embedding_scale(x.shape[-1])


def keep_mask(batch: int, p: float, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """(B,) bool, False with probability p (the rows whose conditioning is dropped; Ho & Salimans Algorithm 1)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p: {p!r} is not allowed; expected 0 <= p <= 1")
    gen_device = generator.device if generator is not None else device
    return (torch.rand(batch, generator=generator, device=gen_device) >= p).to(device)


def select_by_text_similarity(candidates: Tensor, text: Tensor) -> Tensor:
    """DALL-E 2 sec. 2.2: of K candidate image embeddings (K, B, d) per caption keep, for each caption,
    the one with the highest dot product with its text embedding (B, d) -> (B, d)."""
    if candidates.ndim != 3 or text.ndim != 2 or candidates.shape[1:] != text.shape:
        raise ValueError(f"candidates: shape {tuple(candidates.shape)} is not allowed with text {tuple(text.shape)}; "
                         "expected (K, B, d) and (B, d)")
    scores = (candidates.float() * text.float()[None]).sum(-1)  # (K, B)
    best = scores.argmax(0)
    return candidates[best, torch.arange(text.shape[0], device=text.device)]


def with_text(net: Callable[..., Tensor], text: Tensor | None, keep: Tensor | None = None) -> Callable[..., Tensor]:
    """The prior network with text embeddings bound (``emb``; rows with ``keep`` False use its null
    embedding); ``text`` None: the network at the null embedding (the unconditional prior)."""

    def conditioned(x, t, y=None, **kwargs):
        if keep is not None:
            kwargs["emb_keep"] = keep
        return net(x, t, y, emb=text, **kwargs)

    return conditioned


def embedding_guidance(net: Callable[..., Tensor], guidance_scale: float, emb: Tensor) -> Callable[..., Tensor]:
    """``net(x, t, y)`` guided towards the embedding ``emb`` (Ho & Salimans eq. 6):
    (1 + w) net(x, t, emb) - w net(x, t, emb=None). For a learned-variance output (2C channels) the
    conditional variance channels are kept, as :func:`~pipeline.diffusion.guidance.classifier_free_guidance`."""
    w = float(guidance_scale)

    def guided(x: Tensor, t: Tensor, y: Tensor | None = None, **kwargs: Any) -> Tensor:
        out_c = net(x, t, y, emb=emb, **kwargs)
        if w == 0.0:
            return out_c
        out_u = net(x, t, y, emb=None, **kwargs)
        c = x.shape[1]
        mixed = (1 + w) * out_c[:, :c] - w * out_u[:, :c]
        return torch.cat([mixed, out_c[:, c:]], dim=1) if out_c.shape[1] > c else mixed

    return guided


def _embeddings(cond: dict[str, Tensor] | None, names: tuple[str, ...], objective: str) -> list[Tensor]:
    missing = [n for n in names if cond is None or n not in cond]
    if missing:
        have = sorted(cond) if cond else []
        raise ValueError(f"the {objective} objective needs the per-sample CLIP embeddings {list(names)} in the batch "
                         f"(missing {missing}; the batch has {have or 'none'}): prepare the data with "
                         f"launch/prepare_data.py --embed clip and set data.fields: [{', '.join(names)}]")
    out = [cond[n] for n in names]
    for n, z in zip(names, out):
        if z.ndim != 2:
            raise ValueError(f"{n}: expected (B, d) embeddings, got shape {tuple(z.shape)}")
    return out


def _embed_dim(net) -> int | None:
    config = getattr(net, "config", None)
    for name in ("embed_dim", "cond_embed_dim"):
        if config is not None and hasattr(config, name):
            return int(getattr(config, name) or 0)
    return None


class UnclipPriorObjective(nn.Module):
    """The prior's loss (DALL-E 2 sec. 2.2): MSE of the network's prediction of the scaled image
    embedding sqrt(d) z_i from its noised version, given z_t (dropped with ``text_dropout``).

    ``x0`` (the images of the batch) is not used: the data of the prior are the embeddings in
    ``cond`` ("clip_img", "clip_txt"). The loss is the DDPM objective's L_simple on x0 (reused).
    """

    def __init__(self, schedule: str = "cosine", timesteps: int = 1000, text_dropout: float = 0.1):
        super().__init__()
        if not 0.0 <= text_dropout <= 1.0:
            raise ValueError(f"text_dropout: {text_dropout!r} is not allowed; expected a number in [0, 1]")
        self.base = DDPMObjective(schedule, timesteps, parameterization="x0", variance="fixed_small", loss="simple",
                                  vlb_weight=0.0)
        self.text_dropout = float(text_dropout)
        self.importance = None

    @property
    def schedule(self):
        return self.base.schedule

    @property
    def num_timesteps(self) -> int:
        return self.base.num_timesteps

    def training_loss(self, net, x0: Tensor, y: Tensor | None = None, *, generator=None,
                      cond: dict[str, Tensor] | None = None) -> ObjectiveLoss:
        image, text = _embeddings(cond, (CLIP_IMAGE, CLIP_TEXT), "prior")
        if image.shape != text.shape:
            raise ValueError(f"{CLIP_IMAGE} {tuple(image.shape)} and {CLIP_TEXT} {tuple(text.shape)}: the image and "
                             "text embeddings must have the same shape")
        d = _embed_dim(net)
        if d is not None and d != image.shape[1]:
            raise ValueError(f"model.overrides.embed_dim: {d} is not allowed with {image.shape[1]}-dimensional CLIP "
                             f"embeddings in the data; set model.overrides.embed_dim={image.shape[1]}")
        keep = keep_mask(image.shape[0], self.text_dropout, generator, image.device)
        target = scale_embedding(image.float())
        return self.base.training_loss(with_text(net, text.float(), keep), target, None, generator=generator)

    def forward(self, net, x0, y=None, *, generator=None, cond=None):
        return self.training_loss(net, x0, y, generator=generator, cond=cond)


class UnclipDecoderObjective(DDPMObjective):
    """The decoder's loss (DALL-E 2 sec. 2.1): the DDPM-family loss of the U-Net given the CLIP image
    embedding z_i, which is zeroed (= withheld) with probability ``embedding_dropout``. The caption
    dropout of DALL-E 2 (0.5, on a text encoder's tokens) has no counterpart: there is no text encoder."""

    def __init__(self, embedding_dropout: float = 0.1, **ddpm: Any):
        super().__init__(**ddpm)
        if not 0.0 <= embedding_dropout <= 1.0:
            raise ValueError(f"embedding_dropout: {embedding_dropout!r} is not allowed; expected a number in [0, 1]")
        self.embedding_dropout = float(embedding_dropout)

    def training_loss(self, net, x0: Tensor, y: Tensor | None = None, *, generator=None,
                      cond: dict[str, Tensor] | None = None) -> ObjectiveLoss:
        (image,) = _embeddings(cond, (CLIP_IMAGE,), "decoder")
        d = _embed_dim(net)
        if d is not None and d != image.shape[1]:
            raise ValueError(f"model.overrides.cond_embed_dim: {d} is not allowed with {image.shape[1]}-dimensional "
                             f"CLIP embeddings in the data; set model.overrides.cond_embed_dim={image.shape[1]}")
        keep = keep_mask(image.shape[0], self.embedding_dropout, generator, image.device)
        emb = image.to(x0.dtype) * keep[:, None].to(x0.dtype)  # zero = no embedding (the U-Net's emb=None)
        return super().training_loss(with_code(net, emb), x0, y, generator=generator)

    def forward(self, net, x0, y=None, *, generator=None, cond=None):
        return self.training_loss(net, x0, y, generator=generator, cond=cond)
