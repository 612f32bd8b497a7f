"""Building blocks of the DDPM / ADM U-Net family (pure torch).

Every block reads the tensors it needs and nothing else: residual blocks take the (activated)
timestep embedding, attention blocks take optional extra context tokens, resampling layers take
only the feature map. The U-Net and the noisy classifier in this package are assembled from
these blocks by configuration alone.

Numerics under autocast: GroupNorm always runs in fp32 and casts back (:class:`GroupNorm32`);
attention goes through ``F.scaled_dot_product_attention``, whose fused kernels (flash and
memory-efficient on GPU, flash on CPU) accumulate the softmax in fp32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "AttentionBlock",
    "AttentionPool2d",
    "Downsample",
    "GroupNorm32",
    "ResBlock",
    "Upsample",
    "timestep_embedding",
    "zero_module",
]


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of float timesteps (B,) -> (B, dim), computed in fp32.

    Transformer positional encoding (Vaswani et al. 2017, Sec. 3.5) applied to the noise level
    (Ho et al. 2020, Appendix B): frequencies ``max_period ** (-i / half)``, [cos, sin] as in
    ADM; DDPM's TensorFlow code orders [sin, cos] and divides by ``half - 1`` (a slightly
    different frequency grid; interchangeable for a network trained from scratch, not for
    loading DDPM's released weights).
    """
    if t.ndim != 1:
        raise ValueError(f"t: expected shape (B,), got {tuple(t.shape)}")
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a module's parameters: residual branches and outputs start as the identity / zero
    (DDPM and ADM initialise the last convolution of each block and of the network this way)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in fp32 whatever the autocast dtype, cast back to the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        y = F.group_norm(x.float(), self.num_groups, weight, bias, self.eps)
        return y.to(x.dtype)


class Downsample(nn.Module):
    """Halve the resolution: a stride-2 3x3 convolution (DDPM) or 2x2 average pooling."""

    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if use_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) if self.conv is not None else F.avg_pool2d(x, 2)


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour, optionally followed by a 3x3 convolution."""

    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1) if use_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.conv is not None else x


class ResBlock(nn.Module):
    """Residual block with timestep conditioning.

    ``use_scale_shift_norm=False``: the embedding is added as a per-channel bias before the second
    norm (DDPM).  ``True``: AdaGN, ``GroupNorm(h) * (1 + s) + b`` with (s, b) from the embedding
    (ADM, Dhariwal & Nichol 2021, Sec. 3).  ``resample`` = "up" / "down" makes it a BigGAN
    up/down-sampling block: both paths are resampled after the first norm and activation
    (Brock et al. 2019; ADM Sec. 3).  The block's forward takes ``silu(emb)``: every block would
    apply the same activation to the same embedding, so the network applies it once.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        *,
        dropout: float,
        use_scale_shift_norm: bool,
        norm_groups: int,
        resample: str | None = None,
    ):
        super().__init__()
        if resample not in (None, "up", "down"):
            raise ValueError(f"resample: {resample!r} is not allowed; use None, 'up' or 'down'")
        self.use_scale_shift_norm = use_scale_shift_norm
        self.resample = resample
        self.norm1 = GroupNorm32(norm_groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels)
        self.norm2 = GroupNorm32(norm_groups, out_channels)
        self.dropout = nn.Dropout(dropout, inplace=True)  # acts on a fresh SiLU output
        self.conv2 = zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.resample == "down":
            return F.avg_pool2d(x, 2)
        return F.interpolate(x, scale_factor=2.0, mode="nearest")

    def forward(self, x: torch.Tensor, emb_act: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.norm1(x))
        if self.resample is not None:
            h, x = self._resample(h), self._resample(x)
        h = self.conv1(h)
        e = self.emb_proj(emb_act)[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + e)
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


def _heads(channels: int, num_heads: int, num_head_channels: int | None) -> int:
    if num_head_channels is not None:
        if channels % num_head_channels:
            raise ValueError(
                f"num_head_channels: {num_head_channels} does not divide the {channels} channels of an attention layer"
            )
        return channels // num_head_channels
    if channels % num_heads:
        raise ValueError(f"num_heads: {num_heads} does not divide the {channels} channels of an attention layer")
    return num_heads


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the pixels of a feature map, with a residual connection.

    Single-head in DDPM; a fixed head count or a fixed width per head (64) in ADM.  With
    ``context_channels`` the block also attends to extra tokens (unCLIP, Ramesh et al. 2022:
    the image embedding projected into a few tokens): their keys and values are concatenated to
    the pixels' own (GLIDE / unCLIP "encoder_kv").
    """

    def __init__(
        self,
        channels: int,
        *,
        num_heads: int,
        num_head_channels: int | None,
        norm_groups: int,
        context_channels: int = 0,
    ):
        super().__init__()
        self.heads = _heads(channels, num_heads, num_head_channels)
        self.norm = GroupNorm32(norm_groups, channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.context_kv = nn.Linear(context_channels, 2 * channels) if context_channels else None
        self.proj_out = zero_module(nn.Linear(channels, channels))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        b, c, hgt, wid = x.shape
        n, d = self.heads, c // self.heads
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, L, C); free for channels_last
        q, k, v = self.qkv(tokens).view(b, -1, 3, n, d).permute(2, 0, 3, 1, 4).unbind(0)
        if self.context_kv is not None and context is not None:
            ck, cv = self.context_kv(context).view(b, -1, 2, n, d).permute(2, 0, 3, 1, 4).unbind(0)
            k, v = torch.cat([ck, k], dim=2), torch.cat([cv, v], dim=2)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(d)) v
        out = self.proj_out(out.transpose(1, 2).reshape(b, hgt * wid, c))
        return x + out.transpose(1, 2).reshape(b, c, hgt, wid)


class AttentionPool2d(nn.Module):
    """Attention pooling (CLIP, Radford et al. 2021; the ADM classifier head).

    The mean token, with a learned positional embedding added to all tokens, queries the pixels;
    the pooled vector is projected to ``out_channels``.  Only the pooled (mean) query is
    computed, since the other tokens' outputs are discarded.
    """

    def __init__(self, spatial_size: int, channels: int, *, num_head_channels: int, out_channels: int):
        super().__init__()
        self.heads = _heads(channels, 1, num_head_channels)
        self.spatial_size = spatial_size
        self.positional_embedding = nn.Parameter(
            torch.randn(spatial_size**2 + 1, channels) / channels**0.5
        )
        # Query and key/value projections are separate modules (not slices of one weight), so
        # each runs through its own forward: sharding wrappers such as ZeRO-3 gather a module's
        # parameters only when that module is called.
        self.q = nn.Linear(channels, channels)
        self.kv = nn.Linear(channels, 2 * channels)
        self.proj_out = nn.Linear(channels, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hgt, wid = x.shape
        if hgt * wid + 1 != self.positional_embedding.shape[0]:
            raise ValueError(
                f"x: attention pooling was built for {self.spatial_size}x{self.spatial_size} features, "
                f"got {hgt}x{wid}; the classifier's input must be image_size"
            )
        tokens = x.flatten(2).transpose(1, 2)
        tokens = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)
        tokens = tokens + self.positional_embedding.to(tokens.dtype)
        n, d = self.heads, c // self.heads
        q = self.q(tokens[:, :1]).view(b, 1, n, d).transpose(1, 2)
        k, v = self.kv(tokens).view(b, -1, 2, n, d).permute(2, 0, 3, 1, 4).unbind(0)
        pooled = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, c)
        return self.proj_out(pooled)
