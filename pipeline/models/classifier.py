"""The ADM noisy classifier p(y | x_t, t) for classifier guidance (Dhariwal & Nichol 2021, Sec. 4).

The network is the U-Net's encoder half (input blocks + middle block, timestep-conditioned)
followed by GroupNorm, SiLU and attention pooling to ``num_classes`` logits.
``clf(x, t) -> logits (B, num_classes)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.layers import AttentionPool2d, GroupNorm32, timestep_embedding
from pipeline.models.unet import BlockNetwork, EncoderConfigMixin, _check_int, build_encoder

__all__ = ["ClassifierConfig", "NoisyClassifier"]


@dataclass(frozen=True)
class ClassifierConfig(EncoderConfigMixin):
    """Architecture of the noisy classifier (the guided-diffusion ``classifier_*`` flags)."""

    architecture: str = field(default="classifier")
    image_size: int = 64
    in_channels: int = 3
    base_channels: int = 128  # classifier_width
    channel_mult: tuple[int, ...] = (1, 2, 3, 4)
    num_res_blocks: int = 2  # classifier_depth
    attention_resolutions: tuple[int, ...] = (32, 16, 8)
    num_heads: int = 1
    num_head_channels: int | None = 64
    dropout: float = 0.0
    use_scale_shift_norm: bool = True
    resblock_updown: bool = True
    num_classes: int = 1000
    norm_groups: int = 32

    def __post_init__(self) -> None:
        if self.architecture != "classifier":
            raise ValueError(
                f"architecture: {self.architecture!r} is not allowed for ClassifierConfig; expected 'classifier'"
            )
        self._validate_encoder()
        _check_int("num_classes", self.num_classes, 1)
        head = self.num_head_channels
        width = self.base_channels * self.channel_mult[-1]
        if head is not None and width % head:
            raise ValueError(f"num_head_channels: {head} does not divide the pooled width {width}")


class NoisyClassifier(BlockNetwork):
    """Timestep-conditioned image classifier: the U-Net encoder + attention pooling."""

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        if not isinstance(config, ClassifierConfig):
            raise ValueError(f"config: expected a ClassifierConfig, got {type(config).__name__}")
        self.config = config
        cfg = config
        emb_dim = 4 * cfg.base_channels
        self.time_embed = nn.Sequential(nn.Linear(cfg.base_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.input_blocks, self.middle_block, _, ch = build_encoder(cfg, cfg.in_channels)
        self.out_norm = GroupNorm32(cfg.norm_groups, ch)
        self.pool = AttentionPool2d(
            cfg.level_resolutions[-1],
            ch,
            num_head_channels=cfg.num_head_channels if cfg.num_head_channels is not None else ch // cfg.num_heads,
            out_channels=cfg.num_classes,
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if x.ndim != 4 or x.shape[1:] != (cfg.in_channels, cfg.image_size, cfg.image_size):
            raise ValueError(
                f"x: expected shape (B, {cfg.in_channels}, {cfg.image_size}, {cfg.image_size}), got {tuple(x.shape)}"
            )
        t = self._timesteps(t, x)
        emb_act = F.silu(self.time_embed(timestep_embedding(t, cfg.base_channels)))
        h = x.contiguous(memory_format=torch.channels_last) if self.channels_last else x
        for block in [*self.input_blocks, self.middle_block]:
            h = self._run(block, h, emb_act, None)
        return self.pool(F.silu(self.out_norm(h)))
