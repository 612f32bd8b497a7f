"""The DDPM / Improved DDPM / ADM U-Net, one class configured into each published network.

``UNetConfig`` is a frozen dataclass that describes the architecture completely, so a checkpoint
or an export can rebuild the network from ``dataclasses.asdict(model.config)`` alone
(:meth:`UNetConfig.from_dict`).  Named presets live in :mod:`pipeline.models.presets`.

Forward contract: ``model(x, t, y=None, *, low_res=None, emb=None)``
  x        (B, C, H, W) noisy image
  t        (B,) float: the diffusion timestep index or a continuous noise-conditioning value
  y        (B,) long class labels; ``num_classes`` is the null label (classifier-free guidance);
           None on a class-conditional model means "all null"
  low_res  (B, low_res_channels, h, w) low-resolution image (super-resolution models)
  emb      (B, cond_embed_dim) vector embedding (unCLIP-style decoders); None means zeros
returns    (B, C, H, W), or (B, 2C, H, W) with ``learn_sigma`` (first C: the prediction, last C:
           the variance interpolation value); C = ``prediction_channels`` when set (VDM Fourier
           features: x has the image's C channels plus its sin/cos features), else x's channels.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from pipeline.models.layers import (
    AttentionBlock,
    Downsample,
    GroupNorm32,
    ResBlock,
    Upsample,
    timestep_embedding,
    zero_module,
)

__all__ = ["UNet", "UNetConfig", "EncoderConfigMixin"]


def _as_int_tuple(name: str, value: Any) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ValueError(f"{name}: {value!r} is not allowed; expected a list of positive integers")
    out = tuple(value)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in out):
        raise ValueError(f"{name}: {value!r} is not allowed; expected a list of positive integers")
    return out


def _check_int(name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name}: {value!r} is not allowed; expected an integer >= {minimum}")


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name}: {value!r} is not allowed; expected true or false")


class EncoderConfigMixin:
    """Validation shared by the U-Net and the classifier (whose network is the U-Net's encoder)."""

    def _validate_encoder(self) -> None:
        object.__setattr__(self, "channel_mult", _as_int_tuple("channel_mult", self.channel_mult))
        if not self.channel_mult:
            raise ValueError("channel_mult: () is not allowed; expected at least one level")
        attention = _as_int_tuple("attention_resolutions", self.attention_resolutions or ())
        object.__setattr__(self, "attention_resolutions", attention)
        for name in ("image_size", "in_channels", "base_channels", "num_heads", "norm_groups"):
            _check_int(name, getattr(self, name), 1)
        _check_int("num_res_blocks", self.num_res_blocks, 1)
        _check_int("num_classes", self.num_classes, 0)
        for name in ("use_scale_shift_norm", "resblock_updown"):
            _check_bool(name, getattr(self, name))
        if self.num_head_channels is not None:
            _check_int("num_head_channels", self.num_head_channels, 1)
        p = self.dropout
        if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0.0 <= p < 1.0:
            raise ValueError(f"dropout: {self.dropout!r} is not allowed; expected a number in [0, 1)")
        factor = 2 ** (len(self.channel_mult) - 1)
        if self.image_size % factor:
            raise ValueError(
                f"image_size: {self.image_size} is not allowed with {len(self.channel_mult)} levels; "
                f"it must be divisible by {factor}"
            )
        levels = self.level_resolutions
        for res in self.attention_resolutions:
            if res not in levels:
                raise ValueError(
                    f"attention_resolutions: {res} is not a resolution of this network; allowed: {list(levels)}"
                )
        for level, mult in enumerate(self.channel_mult):
            ch = self.base_channels * mult
            if ch % self.norm_groups:
                raise ValueError(
                    f"norm_groups: {self.norm_groups} does not divide {ch} channels at level {level} "
                    f"(base_channels {self.base_channels} x channel_mult {mult})"
                )
            has_attention = levels[level] in self.attention_resolutions or level == len(self.channel_mult) - 1
            if has_attention and self.num_head_channels is not None and ch % self.num_head_channels:
                raise ValueError(
                    f"num_head_channels: {self.num_head_channels} does not divide {ch} channels at level {level}"
                )
            if has_attention and self.num_head_channels is None and ch % self.num_heads:
                raise ValueError(f"num_heads: {self.num_heads} does not divide {ch} channels at level {level}")

    @property
    def level_resolutions(self) -> tuple[int, ...]:
        """Feature-map side length at each level, for an ``image_size`` input."""
        return tuple(self.image_size // 2**i for i in range(len(self.channel_mult)))

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        """Rebuild the config from ``dataclasses.asdict`` output (e.g. JSON); unknown keys fail."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; allowed: {sorted(names)}")
        return cls(**data)


@dataclass(frozen=True)
class UNetConfig(EncoderConfigMixin):
    """Architecture of one U-Net.  Resolutions are side lengths in pixels at ``image_size``."""

    architecture: str = field(default="unet")
    image_size: int = 32
    in_channels: int = 3
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (16,)
    # Heads per attention layer: a fixed count, or channels // num_head_channels when that is set.
    num_heads: int = 1
    num_head_channels: int | None = None
    dropout: float = 0.1
    use_scale_shift_norm: bool = False  # AdaGN (ADM) instead of an additive timestep bias (DDPM)
    resblock_updown: bool = False  # BigGAN residual up/down blocks (ADM) instead of conv resampling
    learn_sigma: bool = False  # output 2C channels: prediction + variance interpolation
    # Channels C of the prediction when they differ from the input's (VDM Fourier features: the input
    # is the image plus sin/cos features, the prediction is image-shaped); None: in_channels.
    # ``out_channels`` (the output layer's width) is this, doubled with learn_sigma.
    prediction_channels: int | None = None
    num_classes: int = 0  # 0: unconditional; else an embedding of num_classes + 1 rows (last = null)
    low_res_channels: int = 0  # >0: super-resolution model conditioned on an upsampled low-res image
    cond_embed_dim: int = 0  # >0: conditioned on a vector embedding (unCLIP decoder)
    cond_tokens: int = 4  # extra attention tokens made from that embedding
    norm_groups: int = 32
    # The network embeds t * timestep_scale (1000 / T for converted improved-diffusion models,
    # which were trained on timesteps rescaled to [0, 1000): pipeline.convert).
    timestep_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.architecture != "unet":
            raise ValueError(f"architecture: {self.architecture!r} is not allowed for UNetConfig; expected 'unet'")
        self._validate_encoder()
        _check_bool("learn_sigma", self.learn_sigma)
        _check_int("low_res_channels", self.low_res_channels, 0)
        _check_int("cond_embed_dim", self.cond_embed_dim, 0)
        _check_int("cond_tokens", self.cond_tokens, 1)
        if self.prediction_channels is not None:
            _check_int("prediction_channels", self.prediction_channels, 1)
        if isinstance(self.timestep_scale, bool) or not isinstance(self.timestep_scale, (int, float)) \
                or not self.timestep_scale > 0:
            raise ValueError(f"timestep_scale: {self.timestep_scale!r} is not allowed; expected a number > 0")

    @property
    def data_channels(self) -> int:
        """Channels of the prediction (the image's): ``prediction_channels``, else ``in_channels``."""
        return self.in_channels if self.prediction_channels is None else self.prediction_channels

    @property
    def out_channels(self) -> int:
        return 2 * self.data_channels if self.learn_sigma else self.data_channels

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.base_channels


class _Block(nn.ModuleList):
    """A sequence of layers that each take what they need: ResBlocks the embedding, attention the
    context tokens, resampling layers nothing (one checkpointing unit)."""

    def forward(self, h: torch.Tensor, emb_act: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                h = layer(h, emb_act)
            elif isinstance(layer, AttentionBlock):
                h = layer(h, context)
            else:
                h = layer(h)
        return h


def make_res_block(cfg: EncoderConfigMixin, cin: int, cout: int, resample: str | None = None) -> ResBlock:
    return ResBlock(
        cin,
        cout,
        4 * cfg.base_channels,
        dropout=cfg.dropout,
        use_scale_shift_norm=cfg.use_scale_shift_norm,
        norm_groups=cfg.norm_groups,
        resample=resample,
    )


def make_attention(cfg: EncoderConfigMixin, ch: int, context_channels: int = 0) -> AttentionBlock:
    return AttentionBlock(
        ch,
        num_heads=cfg.num_heads,
        num_head_channels=cfg.num_head_channels,
        norm_groups=cfg.norm_groups,
        context_channels=context_channels,
    )


def build_encoder(cfg: EncoderConfigMixin, in_channels: int, *, context_channels: int = 0):
    """The U-Net's downsampling half and middle block (also the classifier's network).

    Returns ``(input_blocks, middle_block, skip_channels, channels)``: the output of every input
    block is a skip connection whose width is listed in ``skip_channels``; ``channels`` is the
    width at the bottom.
    """
    ch = cfg.base_channels * cfg.channel_mult[0]
    blocks = nn.ModuleList([_Block([nn.Conv2d(in_channels, ch, 3, padding=1)])])
    skips = [ch]
    resolutions = cfg.level_resolutions
    for level, mult in enumerate(cfg.channel_mult):
        for _ in range(cfg.num_res_blocks):
            layers: list[nn.Module] = [make_res_block(cfg, ch, cfg.base_channels * mult)]
            ch = cfg.base_channels * mult
            if resolutions[level] in cfg.attention_resolutions:
                layers.append(make_attention(cfg, ch, context_channels))
            blocks.append(_Block(layers))
            skips.append(ch)
        if level != len(cfg.channel_mult) - 1:
            down = make_res_block(cfg, ch, ch, "down") if cfg.resblock_updown else Downsample(ch, use_conv=True)
            blocks.append(_Block([down]))
            skips.append(ch)
    middle = _Block(
        [make_res_block(cfg, ch, ch), make_attention(cfg, ch, context_channels), make_res_block(cfg, ch, ch)]
    )
    return blocks, middle, skips, ch


class BlockNetwork(nn.Module):
    """What the U-Net and the noisy classifier share: their run options (activation checkpointing,
    channels-last), running one block under them, and checking the timestep argument."""

    def __init__(self) -> None:
        super().__init__()
        self.checkpoint_activations = False
        self.channels_last = False

    def set_activation_checkpointing(self, enabled: bool = True):
        """Recompute each block's activations in the backward pass instead of storing them."""
        self.checkpoint_activations = bool(enabled)
        return self

    def set_channels_last(self, enabled: bool = True):
        """Store weights and run activations in channels-last (NHWC) memory format."""
        self.channels_last = bool(enabled)
        self.to(memory_format=torch.channels_last if enabled else torch.contiguous_format)
        return self

    def _run(self, block: nn.Module, h: torch.Tensor, emb_act: torch.Tensor,
             context: torch.Tensor | None) -> torch.Tensor:
        if self.checkpoint_activations and torch.is_grad_enabled():
            return checkpoint(block, h, emb_act, context, use_reentrant=False)
        return block(h, emb_act, context)

    @staticmethod
    def _timesteps(t: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
        """``t`` as a (B,) tensor on ``x``'s device (a scalar applies to the whole batch)."""
        b = x.shape[0]
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(b)
        if t.shape != (b,):
            raise ValueError(f"t: expected shape ({b},), got {tuple(t.shape)}")
        return t


class UNet(BlockNetwork):
    """The DDPM / ADM U-Net (Ho et al. 2020; Nichol & Dhariwal 2021; Dhariwal & Nichol 2021)."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        if not isinstance(config, UNetConfig):
            raise ValueError(f"config: expected a UNetConfig, got {type(config).__name__}")
        self.config = config
        cfg = config
        emb_dim = cfg.time_embed_dim
        self.time_embed = nn.Sequential(nn.Linear(cfg.base_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_embed = nn.Embedding(cfg.num_classes + 1, emb_dim) if cfg.num_classes else None
        context_channels = 0
        if cfg.cond_embed_dim:
            # unCLIP: the embedding is added to the timestep embedding and also projected into
            # `cond_tokens` extra tokens that every attention layer attends to.
            context_channels = emb_dim
            self.cond_proj = nn.Linear(cfg.cond_embed_dim, emb_dim)
            self.cond_to_tokens = nn.Linear(cfg.cond_embed_dim, cfg.cond_tokens * context_channels)
            self.cond_norm = nn.LayerNorm(context_channels)
        in_ch = cfg.in_channels + cfg.low_res_channels
        self.input_blocks, self.middle_block, skips, ch = build_encoder(
            cfg, in_ch, context_channels=context_channels
        )
        self.output_blocks = nn.ModuleList()
        resolutions = cfg.level_resolutions
        for level in reversed(range(len(cfg.channel_mult))):
            out_ch = cfg.base_channels * cfg.channel_mult[level]
            for i in range(cfg.num_res_blocks + 1):
                layers: list[nn.Module] = [make_res_block(cfg, ch + skips.pop(), out_ch)]
                ch = out_ch
                if resolutions[level] in cfg.attention_resolutions:
                    layers.append(make_attention(cfg, ch, context_channels))
                if level and i == cfg.num_res_blocks:
                    up = make_res_block(cfg, ch, ch, "up") if cfg.resblock_updown else Upsample(ch, use_conv=True)
                    layers.append(up)
                self.output_blocks.append(_Block(layers))
        self.out_norm = GroupNorm32(cfg.norm_groups, ch)
        self.out_conv = zero_module(nn.Conv2d(ch, cfg.out_channels, 3, padding=1))

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor | None = None,
        *,
        low_res: torch.Tensor | None = None,
        emb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"x: expected shape (B, {cfg.in_channels}, H, W), got {tuple(x.shape)}")
        factor = 2 ** (len(cfg.channel_mult) - 1)
        if x.shape[-1] % factor or x.shape[-2] % factor:
            raise ValueError(f"x: height and width must be divisible by {factor} here, got {tuple(x.shape)}")
        b = x.shape[0]
        t = self._timesteps(t, x)
        if cfg.timestep_scale != 1.0:
            t = t.float() * cfg.timestep_scale
        e = self.time_embed(timestep_embedding(t, cfg.base_channels))
        if self.label_embed is not None:
            if y is None:
                y = torch.full((b,), cfg.num_classes, dtype=torch.long, device=x.device)
            e = e + self.label_embed(y)
        elif y is not None:
            raise ValueError("y: class labels were given to a model built with num_classes=0")
        context = None
        if cfg.cond_embed_dim:
            if emb is None:
                emb = x.new_zeros(b, cfg.cond_embed_dim)
            if emb.shape != (b, cfg.cond_embed_dim):
                raise ValueError(f"emb: expected shape ({b}, {cfg.cond_embed_dim}), got {tuple(emb.shape)}")
            e = e + self.cond_proj(emb)
            context = self.cond_norm(self.cond_to_tokens(emb).view(b, cfg.cond_tokens, -1))
        elif emb is not None:
            raise ValueError("emb: a vector embedding was given to a model built with cond_embed_dim=0")
        if cfg.low_res_channels:
            if low_res is None or low_res.ndim != 4 or low_res.shape[:2] != (b, cfg.low_res_channels):
                got = None if low_res is None else tuple(low_res.shape)
                raise ValueError(f"low_res: expected shape ({b}, {cfg.low_res_channels}, h, w), got {got}")
            # ADM-U: the low-resolution image, bilinearly upsampled, is concatenated to x.
            up = F.interpolate(low_res.to(x.dtype), size=x.shape[-2:], mode="bilinear", align_corners=False)
            x = torch.cat([x, up], dim=1)
        elif low_res is not None:
            raise ValueError("low_res: a low-resolution image was given to a model built with low_res_channels=0")
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        emb_act = F.silu(e)
        h, hs = x, []
        for block in self.input_blocks:
            h = self._run(block, h, emb_act, context)
            hs.append(h)
        h = self._run(self.middle_block, h, emb_act, context)
        for block in self.output_blocks:
            h = self._run(block, torch.cat([h, hs.pop()], dim=1), emb_act, context)
        return self.out_conv(F.silu(self.out_norm(h)))
