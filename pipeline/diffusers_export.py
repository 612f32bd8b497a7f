"""Our U-Net as diffusers' ``UNet2DModel``, and the training schedule as a ``DDPMScheduler``.

diffusers' ``UNet2DModel`` is the DDPM U-Net, and with ``resnet_time_scale_shift="scale_shift"``
(AdaGN) and ``downsample_type`` / ``upsample_type = "resnet"`` (BigGAN residual resampling) it is
ADM's. What maps, layer by layer:

================================  ============================================================
ours                              diffusers
================================  ============================================================
sinusoid [cos, sin], base width   ``Timesteps(block_out_channels[0], flip_sin_to_cos=True, 0)``
``time_embed.0`` / ``.2``         ``time_embedding.linear_1`` / ``linear_2``
``label_embed`` (K + 1 rows)      ``class_embedding`` (``num_class_embeds = K + 1``)
ResBlock norm1/conv1/emb_proj/    ResnetBlock2D norm1/conv1/time_emb_proj/norm2/conv2/
norm2/conv2/skip                  conv_shortcut
AttentionBlock qkv (fused)        Attention to_q / to_k / to_v (rows 0:C, C:2C, 2C:3C), to_out.0
middle res/attn/res               ``mid_block`` (its attention with ``attn_norm_num_groups``)
================================  ============================================================

What does not map, refused with a clear error: a first channel multiplier other than 1 (the
timestep sinusoid would change width), attention layers whose head widths differ (diffusers has
one ``attention_head_dim``), super-resolution and embedding-conditioned models, the noisy
classifier, and objectives other than discrete DDPM (no DDPMScheduler for them).

diffusers is an optional dependency, imported only inside the functions that need it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pipeline.config import DiffusionConfig

__all__ = [
    "UNET_WEIGHTS",
    "UnsupportedArchitectureError",
    "build_diffusers_unet",
    "check_mappable",
    "diffusers_unet_config",
    "scheduler_config",
    "to_diffusers_state_dict",
    "write_diffusers",
]

UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"  # where save_pretrained puts the UNet's weights
_PREDICTION = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
_VARIANCE = {"fixed_small": "fixed_small", "fixed_large": "fixed_large", "learned_range": "learned_range"}
_GN_EPS = 1e-5  # torch.nn.GroupNorm's default, which our GroupNorm32 keeps


class UnsupportedArchitectureError(ValueError):
    """The network (or objective) has no faithful diffusers counterpart."""


def _require_diffusers():
    try:
        import diffusers
    except ImportError:
        raise UnsupportedArchitectureError(
            "--format diffusers needs the optional dependency diffusers: pip install 'diffusers>=0.30'") from None
    return diffusers


def _attention_channels(cfg) -> list[int]:
    """Width of every attention layer: each attended level, and the middle block."""
    levels = cfg.level_resolutions
    widths = [cfg.base_channels * m for lv, m in enumerate(cfg.channel_mult) if levels[lv] in cfg.attention_resolutions]
    return widths + [cfg.base_channels * cfg.channel_mult[-1]]


def _attention_head_dim(cfg) -> int | None:
    """diffusers' single ``attention_head_dim`` (None: one head per layer, of the layer's width)."""
    if cfg.num_head_channels is not None:
        return int(cfg.num_head_channels)
    if cfg.num_heads == 1:
        return None
    dims = sorted({ch // cfg.num_heads for ch in _attention_channels(cfg)})
    if len(dims) != 1:
        raise UnsupportedArchitectureError(
            f"num_heads: {cfg.num_heads} heads over attention layers of widths {_attention_channels(cfg)} give head "
            f"widths {dims}; diffusers' UNet2DModel has one attention_head_dim for every layer, so this network does "
            f"not map (it would with num_head_channels set)")
    return dims[0]


def check_mappable(cfg, diffusion: DiffusionConfig | None = None) -> None:
    """Raise :class:`UnsupportedArchitectureError` naming what has no diffusers counterpart."""
    from pipeline.models import UNetConfig

    if not isinstance(cfg, UNetConfig):
        raise UnsupportedArchitectureError(
            f"model: a {type(cfg).__name__} ({getattr(cfg, 'architecture', '?')}) has no diffusers UNet2DModel "
            f"counterpart; only the DDPM / ADM U-Net maps")
    if cfg.low_res_channels:
        raise UnsupportedArchitectureError(
            f"low_res_channels: {cfg.low_res_channels}: super-resolution models do not map onto UNet2DModel "
            f"(export them with --format native)")
    if cfg.cond_embed_dim:
        raise UnsupportedArchitectureError(
            f"cond_embed_dim: {cfg.cond_embed_dim}: embedding-conditioned models do not map onto UNet2DModel "
            f"(export them with --format native)")
    if cfg.channel_mult[0] != 1:
        raise UnsupportedArchitectureError(
            f"channel_mult: {list(cfg.channel_mult)}: the first multiplier must be 1 for diffusers, whose timestep "
            f"sinusoid has block_out_channels[0] dimensions (ours has base_channels)")
    _attention_head_dim(cfg)
    if diffusion is not None:
        if diffusion.objective not in _scheduler_objectives():
            raise UnsupportedArchitectureError(
                f"diffusion.objective: {diffusion.objective!r} has no DDPMScheduler counterpart; --format diffusers "
                f"supports the discrete {' or '.join(map(repr, _scheduler_objectives()))} objective (export the others "
                "with --format native)")
        if (diffusion.variance == "learned_range") != cfg.learn_sigma:
            raise UnsupportedArchitectureError(
                f"diffusion.variance: {diffusion.variance!r} with learn_sigma={cfg.learn_sigma} is inconsistent")


def diffusers_unet_config(cfg) -> dict[str, Any]:
    """``UNet2DModel(**config)`` arguments for our ``UNetConfig``."""
    check_mappable(cfg)
    levels = cfg.level_resolutions
    attn = [levels[lv] in cfg.attention_resolutions for lv in range(len(cfg.channel_mult))]
    down_plain = "ResnetDownsampleBlock2D" if cfg.resblock_updown else "DownBlock2D"
    up_plain = "ResnetUpsampleBlock2D" if cfg.resblock_updown else "UpBlock2D"
    return {
        "sample_size": cfg.image_size,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "time_embedding_type": "positional",
        "time_embedding_dim": 4 * cfg.base_channels,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "down_block_types": ["AttnDownBlock2D" if a else down_plain for a in attn],
        "up_block_types": ["AttnUpBlock2D" if a else up_plain for a in reversed(attn)],
        "block_out_channels": [cfg.base_channels * m for m in cfg.channel_mult],
        "layers_per_block": cfg.num_res_blocks,
        "mid_block_scale_factor": 1,
        "downsample_padding": 1,
        "downsample_type": "resnet" if cfg.resblock_updown else "conv",
        "upsample_type": "resnet" if cfg.resblock_updown else "conv",
        "dropout": float(cfg.dropout),
        "act_fn": "silu",
        "attention_head_dim": _attention_head_dim(cfg),
        "norm_num_groups": cfg.norm_groups,
        "attn_norm_num_groups": cfg.norm_groups,
        "norm_eps": _GN_EPS,
        "resnet_time_scale_shift": "scale_shift" if cfg.use_scale_shift_norm else "default",
        "add_attention": True,
        "class_embed_type": None,
        "num_class_embeds": cfg.num_classes + 1 if cfg.num_classes else None,
    }


def _module_pairs(cfg) -> list[tuple[str, str, str]]:
    """(our module prefix, diffusers module prefix, kind) for every module with parameters."""
    pairs = [("time_embed.0", "time_embedding.linear_1", "plain"), ("time_embed.2", "time_embedding.linear_2", "plain"),
             ("input_blocks.0.0", "conv_in", "plain"), ("out_norm", "conv_norm_out", "plain"),
             ("out_conv", "conv_out", "plain")]
    if cfg.num_classes:
        pairs.append(("label_embed", "class_embedding", "plain"))
    levels, n_levels, nrb = cfg.level_resolutions, len(cfg.channel_mult), cfg.num_res_blocks
    k = 1
    for lv in range(n_levels):
        attn = levels[lv] in cfg.attention_resolutions
        for j in range(nrb):
            pairs.append((f"input_blocks.{k}.0", f"down_blocks.{lv}.resnets.{j}", "resnet"))
            if attn:
                pairs.append((f"input_blocks.{k}.1", f"down_blocks.{lv}.attentions.{j}", "attention"))
            k += 1
        if lv != n_levels - 1:
            if cfg.resblock_updown:
                pairs.append((f"input_blocks.{k}.0", f"down_blocks.{lv}.downsamplers.0", "resnet"))
            else:
                pairs.append((f"input_blocks.{k}.0.conv", f"down_blocks.{lv}.downsamplers.0.conv", "plain"))
            k += 1
    pairs += [("middle_block.0", "mid_block.resnets.0", "resnet"), ("middle_block.1", "mid_block.attentions.0", "attention"),
              ("middle_block.2", "mid_block.resnets.1", "resnet")]
    k = 0
    for u, lv in enumerate(reversed(range(n_levels))):
        attn = levels[lv] in cfg.attention_resolutions
        for i in range(nrb + 1):
            pairs.append((f"output_blocks.{k}.0", f"up_blocks.{u}.resnets.{i}", "resnet"))
            layer = 1
            if attn:
                pairs.append((f"output_blocks.{k}.1", f"up_blocks.{u}.attentions.{i}", "attention"))
                layer = 2
            if lv and i == nrb:
                if cfg.resblock_updown:
                    pairs.append((f"output_blocks.{k}.{layer}", f"up_blocks.{u}.upsamplers.0", "resnet"))
                else:
                    pairs.append((f"output_blocks.{k}.{layer}.conv", f"up_blocks.{u}.upsamplers.0.conv", "plain"))
            k += 1
    return pairs


_RESNET = {"norm1": "norm1", "conv1": "conv1", "emb_proj": "time_emb_proj", "norm2": "norm2", "conv2": "conv2",
           "skip": "conv_shortcut"}


def to_diffusers_state_dict(state: dict[str, torch.Tensor], cfg) -> dict[str, torch.Tensor]:
    """Our U-Net's ``state_dict`` renamed (and the fused qkv split) for ``UNet2DModel``."""
    check_mappable(cfg)
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(src: str, dst: str, value: torch.Tensor | None = None) -> None:
        out[dst] = (state[src] if value is None else value).clone()
        used.add(src)

    for ours, theirs, kind in _module_pairs(cfg):
        names = [k for k in state if k.startswith(ours + ".")]
        for name in names:
            rest = name[len(ours) + 1:]
            if kind == "plain":
                take(name, f"{theirs}.{rest}")
            elif kind == "resnet":
                sub, _, leaf = rest.partition(".")
                if sub not in _RESNET:
                    raise RuntimeError(f"unexpected residual-block parameter {name}")
                take(name, f"{theirs}.{_RESNET[sub]}.{leaf}")
            else:  # attention
                sub, _, leaf = rest.partition(".")
                if sub == "norm":
                    take(name, f"{theirs}.group_norm.{leaf}")
                elif sub == "proj_out":
                    take(name, f"{theirs}.to_out.0.{leaf}")
                elif sub == "qkv":
                    q, k, v = state[name].chunk(3, dim=0)  # rows: [q heads | k heads | v heads]
                    take(name, f"{theirs}.to_q.{leaf}", q)
                    take(name, f"{theirs}.to_k.{leaf}", k)
                    take(name, f"{theirs}.to_v.{leaf}", v)
                else:
                    raise RuntimeError(f"unexpected attention parameter {name}")
    left = sorted(set(state) - used)
    if left:
        raise UnsupportedArchitectureError(f"parameters with no diffusers counterpart: {left[:8]}")
    return out


def build_diffusers_unet(state: dict[str, torch.Tensor], cfg):
    """A ``diffusers.UNet2DModel`` holding ``state`` (our U-Net's weights), in eval mode."""
    diffusers = _require_diffusers()
    with torch.random.fork_rng(devices=[]):  # its initial weights are replaced; leave the caller's RNG alone
        unet = diffusers.UNet2DModel(**diffusers_unet_config(cfg))
    mapped = to_diffusers_state_dict(state, cfg)
    expected = unet.state_dict()
    wrong = sorted(k for k in mapped if k in expected and expected[k].shape != mapped[k].shape)
    if set(mapped) != set(expected) or wrong:
        raise RuntimeError(
            f"diffusers mapping is incomplete: missing {sorted(set(expected) - set(mapped))[:6]}, unexpected "
            f"{sorted(set(mapped) - set(expected))[:6]}, wrong shapes {wrong[:6]}")
    unet.load_state_dict(mapped, strict=True)
    return unet.eval()


def _scheduler_objectives() -> tuple[str, ...]:
    """The objectives a DDPMScheduler can sample: the generative discrete-time ones."""
    from pipeline.diffusion.registry import OBJECTIVES

    return tuple(n for n, s in OBJECTIVES.items() if s.discrete and s.generative)


def scheduler_config(diffusion: DiffusionConfig) -> dict[str, Any]:
    """``DDPMScheduler(**config)`` for the training schedule: its betas exactly, its parameterisation."""
    from pipeline.diffusion.schedules import build_schedule, linear_betas

    if diffusion.objective not in _scheduler_objectives():
        raise UnsupportedArchitectureError(
            f"diffusion.objective: {diffusion.objective!r} has no DDPMScheduler counterpart; use "
            f"{' or '.join(map(repr, _scheduler_objectives()))}")
    betas = build_schedule(diffusion.schedule, diffusion.timesteps).betas
    config: dict[str, Any] = {
        "num_train_timesteps": diffusion.timesteps,
        "beta_schedule": "linear" if diffusion.schedule == "linear" else "squaredcos_cap_v2",
        "trained_betas": [float(b) for b in betas],  # exact: diffusers' linspace is float32
        "variance_type": _VARIANCE[diffusion.variance],
        "prediction_type": _PREDICTION[diffusion.parameterization],
        "clip_sample": True,
        "clip_sample_range": 1.0,
        "timestep_spacing": "leading",
    }
    if diffusion.schedule == "linear":
        ends = linear_betas(diffusion.timesteps)
        config.update(beta_start=float(ends[0]), beta_end=float(ends[-1]))
    return config


def write_diffusers(folder: str | Path, state: dict[str, torch.Tensor], cfg, diffusion: DiffusionConfig) -> None:
    """A ``DDPMPipeline`` folder (``model_index.json``, ``unet/``, ``scheduler/``), safetensors weights."""
    diffusers = _require_diffusers()
    check_mappable(cfg, diffusion)
    unet = build_diffusers_unet(state, cfg)
    scheduler = diffusers.DDPMScheduler(**scheduler_config(diffusion))
    diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(str(folder), safe_serialization=True)
    if not (Path(folder) / UNET_WEIGHTS).is_file():
        raise RuntimeError(f"diffusers {diffusers.__version__} did not write {UNET_WEIGHTS}")
