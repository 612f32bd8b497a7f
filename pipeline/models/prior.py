"""The unCLIP diffusion prior's network: a decoder-only (causal) Transformer over CLIP embeddings.

DALL-E 2 (Ramesh et al. 2022, sec. 2.2): "a decoder-only Transformer with a causal attention mask
on a sequence consisting of, in order: the encoded text, the CLIP text embedding, an embedding
for the diffusion timestep, the noised CLIP image embedding, and a final embedding whose output
from the Transformer is used to predict the unnoised CLIP image embedding". Here there is no text
encoder, so the sequence is the last four: [text embedding, timestep embedding, noised image
embedding, learned final query], each projected to the Transformer's width, plus a learned
position embedding per token; the final query's output, layer-normed and projected back to the
embedding dimension, is the prediction of the clean (scaled) image embedding x0.

``PriorConfig`` describes it completely (``dataclasses.asdict`` round-trips through
:meth:`PriorConfig.from_dict`), so checkpoints and exports rebuild it like the U-Net.

Forward contract (the model callable of ``pipeline.diffusion``): ``model(x, t, y=None, *, emb=None,
emb_keep=None)``
  x         (B, embed_dim) noised image embedding (in the objective's sqrt(d)-scaled units)
  t         (B,) float diffusion timestep
  y         must be None (the prior takes no class labels)
  emb       (B, embed_dim) CLIP text embedding; None: the learned null embedding for every row
  emb_keep  (B,) bool: False rows use the learned null embedding instead of ``emb`` (text dropped for
            classifier-free guidance, Ho & Salimans 2022); None: keep all
returns   (B, embed_dim)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from pipeline.models.layers import timestep_embedding

__all__ = ["PriorConfig", "PriorTransformer"]

NUM_TOKENS = 4  # text embedding, timestep, noised image embedding, final query


def _positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}: {value!r} is not allowed; expected an integer >= 1")


@dataclass(frozen=True)
class PriorConfig:
    """Architecture of one prior Transformer."""

    architecture: str = field(default="prior")
    embed_dim: int = 512  # d: the CLIP embedding dimension (text and image)
    width: int = 512
    layers: int = 6
    heads: int = 8
    mlp_ratio: int = 4
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.architecture != "prior":
            raise ValueError(f"architecture: {self.architecture!r} is not allowed for PriorConfig; expected 'prior'")
        for name in ("embed_dim", "width", "layers", "heads", "mlp_ratio"):
            _positive_int(name, getattr(self, name))
        if self.width % self.heads:
            raise ValueError(f"heads: {self.heads} does not divide width {self.width}")
        p = self.dropout
        if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0.0 <= p < 1.0:
            raise ValueError(f"dropout: {self.dropout!r} is not allowed; expected a number in [0, 1)")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PriorConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; allowed: {sorted(names)}")
        return cls(**data)


class PriorTransformer(nn.Module):
    """DALL-E 2's diffusion prior network (sec. 2.2), predicting the clean image embedding."""

    def __init__(self, config: PriorConfig):
        super().__init__()
        if not isinstance(config, PriorConfig):
            raise ValueError(f"config: expected a PriorConfig, got {type(config).__name__}")  # noqa: TRY004
        self.config = cfg = config
        w = cfg.width
        self.text_proj = nn.Linear(cfg.embed_dim, w)
        self.image_proj = nn.Linear(cfg.embed_dim, w)
        self.time_embed = nn.Sequential(nn.Linear(w, w), nn.SiLU(), nn.Linear(w, w))
        self.null_text = nn.Parameter(torch.zeros(cfg.embed_dim))  # the dropped text (classifier-free guidance)
        self.query = nn.Parameter(torch.randn(w) * 0.02)
        self.positions = nn.Parameter(torch.randn(NUM_TOKENS, w) * 0.02)
        self.blocks = nn.ModuleList([
            nn.TransformerEncoderLayer(w, cfg.heads, cfg.mlp_ratio * w, cfg.dropout, activation="gelu",
                                       batch_first=True, norm_first=True)  # pre-LN (GPT-2 style)
            for _ in range(cfg.layers)])
        self.out_norm = nn.LayerNorm(w)
        self.out = nn.Linear(w, cfg.embed_dim)
        self.checkpoint_activations = False

    def set_activation_checkpointing(self, enabled: bool = True) -> PriorTransformer:
        """Recompute each Transformer layer's activations in the backward pass instead of storing them."""
        self.checkpoint_activations = bool(enabled)
        return self

    def set_channels_last(self, enabled: bool = True) -> PriorTransformer:
        if enabled:
            raise ValueError("model.channels_last: true is not allowed for the prior (it has no image channels)")
        return self

    def text_tokens(self, emb: torch.Tensor | None, keep: torch.Tensor | None, b: int,
                    like: torch.Tensor) -> torch.Tensor:
        """(B, d) the text embeddings with dropped rows (``keep`` False, or all when ``emb`` is None) replaced
        by the learned null embedding."""
        d = self.config.embed_dim
        null = self.null_text.to(like.dtype).expand(b, d)
        if emb is None:
            return null
        if emb.shape != (b, d):
            raise ValueError(f"emb: expected the text embeddings of shape ({b}, {d}), got {tuple(emb.shape)}")
        if keep is None:
            return emb.to(like.dtype)
        if keep.shape != (b,):
            raise ValueError(f"emb_keep: expected shape ({b},), got {tuple(keep.shape)}")
        return torch.where(keep.to(torch.bool)[:, None], emb.to(like.dtype), null)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None, *,
                emb: torch.Tensor | None = None, emb_keep: torch.Tensor | None = None) -> torch.Tensor:
        cfg = self.config
        if x.ndim != 2 or x.shape[1] != cfg.embed_dim:
            raise ValueError(f"x: expected image embeddings of shape (B, {cfg.embed_dim}), got {tuple(x.shape)}")
        if y is not None:
            raise ValueError("y: class labels are not allowed for the prior; it is conditioned on text embeddings")
        b = x.shape[0]
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(b) if t.ndim == 0 else t
        if t.shape != (b,):
            raise ValueError(f"t: expected shape ({b},), got {tuple(t.shape)}")
        text = self.text_tokens(emb, emb_keep, b, x)
        time = self.time_embed(timestep_embedding(t, cfg.width).to(x.dtype))
        tokens = torch.stack([self.text_proj(text), time, self.image_proj(x), self.query.to(x.dtype).expand(b, -1)],
                             dim=1)
        h = tokens + self.positions.to(x.dtype)
        # causal: token i attends to tokens <= i (made here, not a buffer: exports hold weights only)
        mask = nn.Transformer.generate_square_subsequent_mask(NUM_TOKENS, device=h.device, dtype=h.dtype)
        for block in self.blocks:
            if self.checkpoint_activations and torch.is_grad_enabled():
                h = checkpoint(block, h, mask, None, True, use_reentrant=False)
            else:
                h = block(h, src_mask=mask, is_causal=True)
        return self.out(self.out_norm(h[:, -1]))

