"""Networks: the DDPM / ADM U-Net family, the ADM noisy classifier and super-resolution model.

Pure torch; no distributed or storage imports.  Choose a network by preset name::

    model = build_model("ddpm_cifar10")                  # 35.7M parameters
    model = build_model("tiny", num_classes=10)           # fast CPU network, class-conditional
    model = build_model_from_dict(dataclasses.asdict(model.config))   # rebuild from a checkpoint
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from pipeline.models.classifier import ClassifierConfig, NoisyClassifier
from pipeline.models.presets import PRESETS, PUBLISHED_PARAMETERS
from pipeline.models.prior import PriorConfig, PriorTransformer
from pipeline.models.unet import UNet, UNetConfig

__all__ = [
    "ClassifierConfig",
    "NoisyClassifier",
    "PRESETS",
    "PUBLISHED_PARAMETERS",
    "PriorConfig",
    "PriorTransformer",
    "UNet",
    "UNetConfig",
    "build_model",
    "build_model_from_config",
    "build_model_from_dict",
    "build_network",
    "count_parameters",
    "meta_parameter_count",
    "resolve_preset",
]

# Architecture name -> (config class, module class); the only place a config picks a class.
_ARCHITECTURES: dict[str, tuple[type, type[nn.Module]]] = {
    "unet": (UNetConfig, UNet),
    "classifier": (ClassifierConfig, NoisyClassifier),
    "prior": (PriorConfig, PriorTransformer),  # unCLIP's diffusion prior over CLIP embeddings
}


def resolve_preset(preset: str, **overrides: Any) -> UNetConfig | ClassifierConfig | PriorConfig:
    """The preset's config with ``overrides`` applied; unknown names raise ValueError."""
    if preset not in PRESETS:
        raise ValueError(f"model preset {preset!r} is unknown; allowed: {', '.join(sorted(PRESETS))}")
    base = PRESETS[preset]
    allowed = sorted(f.name for f in dataclasses.fields(base) if f.name != "architecture")
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise ValueError(
            f"model override(s) {', '.join(unknown)} not allowed for preset {preset!r}; allowed: {', '.join(allowed)}"
        )
    return dataclasses.replace(base, **overrides)


def build_network(config: UNetConfig | ClassifierConfig | PriorConfig) -> nn.Module:
    """The module described by a config object."""
    for config_cls, module_cls in _ARCHITECTURES.values():
        if type(config) is config_cls:
            return module_cls(config)
    allowed = ", ".join(c.__name__ for c, _ in _ARCHITECTURES.values())
    raise ValueError(f"config: expected one of {allowed}, got {type(config).__name__}")


def build_model(preset: str, **overrides: Any) -> nn.Module:
    """Build a registered network by name, e.g. ``build_model("adm_imagenet64", dropout=0.0)``."""
    return build_network(resolve_preset(preset, **overrides))


def build_model_from_dict(data: dict[str, Any]) -> nn.Module:
    """Rebuild a network from ``dataclasses.asdict(model.config)`` (no preset name needed)."""
    arch = data.get("architecture")
    if arch not in _ARCHITECTURES:
        raise ValueError(f"architecture: {arch!r} is unknown; allowed: {', '.join(sorted(_ARCHITECTURES))}")
    config_cls, module_cls = _ARCHITECTURES[arch]
    return module_cls(config_cls.from_dict(data))


def build_model_from_config(cfg: Any) -> nn.Module:
    """Build from a ``pipeline.config.ModelConfig`` (preset, overrides, runtime options)."""
    model = build_model(cfg.preset, **dict(cfg.overrides))
    if cfg.checkpoint_activations:
        model.set_activation_checkpointing(True)
    if cfg.channels_last:
        model.set_channels_last(True)
    return model


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (works on the meta device)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def meta_parameter_count(preset: str, **overrides: Any) -> int:
    """Parameter count of a preset built on the meta device (no memory, no initialisation)."""
    with torch.device("meta"):
        return count_parameters(build_model(preset, **overrides))
