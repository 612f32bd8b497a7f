"""One way to load a trained model: ``(network, objective, config)`` from a run checkpoint or an export.

    from pipeline.loading import load_model

    m = load_model("runs/quickstart")                           # newest checkpoint, its first EMA
    m = load_model("runs/quickstart", checkpoint=36000, ema_rate=0.999)
    m = load_model("runs/quickstart", posthoc_sigma=0.07)        # post-hoc EMA at the last snapshot
    m = load_model("runs/quickstart/export/ema")                # an export folder
    view = m.view()                                             # what pipeline.diffusion.sample drives

A checkpoint's EMA is assembled from its per-rank slices (any ZeRO stage; no DeepSpeed, Ray or
pickle); an export's weights are checked against the sha256 in its ``config.json``. The objective
module is the registry's (``pipeline.diffusion.OBJECTIVES``) with its own trained parameters
(VDM's learned schedule) when it has any. Everything in this project that loads a trained model
(evaluation, ``launch/sample.py``, export, the training-time grid) goes through here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.config import DiffusionConfig, ExperimentConfig
from pipeline.pretrained import CONFIG_FILE, load_pretrained, objective_from_state

__all__ = [
    "NET_PREFIX",
    "OBJECTIVE_PREFIX",
    "TrainedModel",
    "from_weights",
    "is_export",
    "load_checkpoint_model",
    "load_model",
    "load_posthoc_model",
    "network_from_state",
    "network_state_dict",
    "objective_from_state",
    "objective_state_dict",
]

# The training module (pipeline.train.objective.TrainModule) holds the network as ``net`` and the
# objective as ``objective``; EMA weights and checkpoints carry these prefixes.
NET_PREFIX = "net."
OBJECTIVE_PREFIX = "objective."


@dataclass(frozen=True)
class TrainedModel:
    """A trained network in eval mode, its objective module and the configuration it was trained with."""

    network: nn.Module
    objective: nn.Module  # the registry's objective module, with its trained parameters (if any)
    diffusion: DiffusionConfig
    source: dict[str, Any]  # kind ('checkpoint' | 'export'), where, checkpoint, images seen, EMA rate
    config: Any = None  # ExperimentConfig (checkpoint) or pipeline.pretrained.PretrainedConfig (export)
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return int(getattr(self.network.config, "num_classes", 0) or 0)

    def view(self, net=None):
        """The sampling view of (network, objective); ``net`` replaces the network (e.g. guided)."""
        from pipeline.diffusion.registry import make_view

        return make_view(self.diffusion.objective, self.network if net is None else net, self.objective,
                         self.diffusion.objective_options())


def network_state_dict(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The bare network's ``state_dict`` from EMA weights (``net.`` prefix removed; weights of a bare
    network, as some tools write, are returned unchanged)."""
    if any(k.startswith(NET_PREFIX) for k in weights):
        return {k[len(NET_PREFIX):]: v for k, v in weights.items() if k.startswith(NET_PREFIX)}
    return dict(weights)


def objective_state_dict(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The objective's own parameters (``objective.*`` EMA weights, prefix removed)."""
    return {k[len(OBJECTIVE_PREFIX):]: v for k, v in weights.items() if k.startswith(OBJECTIVE_PREFIX)}


def network_from_state(model: Any, state: dict[str, torch.Tensor], where: str) -> nn.Module:
    """The network of ``model`` (a ModelConfig or its dict) with ``state`` loaded strictly, in eval mode."""
    from pipeline.config import ModelConfig
    from pipeline.models import build_model_from_config

    cfg = model if isinstance(model, ModelConfig) else ModelConfig.model_validate(model)
    with torch.random.fork_rng(devices=[]):  # initial values are replaced; leave the caller's RNG alone
        torch.manual_seed(0)
        network = build_model_from_config(cfg)
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{where}: its weights do not fit the configured network: "
                         f"{str(exc).splitlines()[0]}") from None
    return network.eval()


def from_weights(model: Any, diffusion: DiffusionConfig | dict[str, Any], weights: dict[str, torch.Tensor],
                 where: str, device: str | torch.device = "cpu") -> tuple[nn.Module, nn.Module]:
    """(network, objective module) in eval mode from training-module weights (``net.*`` and
    ``objective.*``: a checkpoint's EMA, a post-hoc reconstruction, the live EMA), loaded strictly."""
    network = network_from_state(model, network_state_dict(weights), where).to(device)
    objective = objective_from_state(diffusion, objective_state_dict(weights), where).to(device)
    return network, objective


def read_run_config(run_url: str) -> ExperimentConfig:
    """The resolved config training saved as ``<run>/config.yaml``."""
    import yaml

    from pipeline.config import ConfigError, build_config
    from pipeline.data import storage

    saved = storage.join(run_url, "config.yaml")
    if not storage.exists(saved):
        raise ValueError(f"run: {run_url!r} has no config.yaml; is it a training run directory?")
    try:
        return build_config(yaml.safe_load(storage.read_bytes(saved)) or {})
    except (yaml.YAMLError, ConfigError) as exc:
        raise ValueError(f"run: {run_url!r}: config.yaml cannot be read: {exc}") from None


def load_posthoc_model(run_url: str, sigma_rel: float, at_images: str | int = "latest", *,
                       config: ExperimentConfig | None = None, device: str | torch.device = "cpu") -> TrainedModel:
    """The post-hoc EMA (EDM2) of relative length ``sigma_rel`` at ``at_images`` ('latest': the last
    snapshot), reconstructed from the run's ``posthoc_ema/`` snapshots (:mod:`pipeline.posthoc`)."""
    from pipeline.posthoc import posthoc_plan, reconstruct

    cfg = config if config is not None else read_run_config(run_url)
    plan = posthoc_plan(run_url, sigma_rel, at_images)
    weights = reconstruct(run_url, sigma_rel, plan=plan)
    where = f"post-hoc EMA sigma_rel {plan.sigma_rel:g} at {plan.at_images} images of {run_url}"
    network, objective = from_weights(cfg.model, cfg.diffusion, weights, where, device)
    source = {"kind": "posthoc", "run": run_url, "images_seen": plan.at_images, "ema_rate": None,
              "posthoc_ema": plan.provenance()}
    return TrainedModel(network, objective, cfg.diffusion, source, cfg, {"posthoc_plan": plan})


def load_checkpoint_model(run_url: str, checkpoint: str | int = "latest", ema_rate: float | None = None, *,
                          config: ExperimentConfig | None = None, device: str | torch.device = "cpu") -> TrainedModel:
    """One EMA of a committed checkpoint of ``run_url`` (``config``: the run's, read when None)."""
    from pipeline.train.checkpoint import load_ema_weights, resolve_checkpoint

    cfg = config if config is not None else read_run_config(run_url)
    ckpt = resolve_checkpoint(run_url, checkpoint)
    weights, _ = load_ema_weights(run_url, ckpt.images_seen, ema_rate)
    where = f"checkpoint {ckpt.rel} of {run_url}"
    network, objective = from_weights(cfg.model, cfg.diffusion, weights, where, device)
    rate = float(ema_rate if ema_rate is not None else ckpt.ema_rates[0])
    source = {"kind": "checkpoint", "run": run_url, "checkpoint": ckpt.rel, "images_seen": ckpt.images_seen,
              "ema_rate": rate}
    return TrainedModel(network, objective, cfg.diffusion, source, cfg, {"checkpoint": ckpt})


def is_export(path: str | Path) -> bool:
    """Whether ``path`` is an export folder (has ``config.json``) rather than a run directory."""
    return (Path(path) / CONFIG_FILE).is_file() and not (Path(path) / "config.yaml").is_file()


def load_model(source: str | Path, *, checkpoint: str | int = "latest", ema_rate: float | None = None,
               device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               verify: bool = True, posthoc_sigma: float | None = None) -> TrainedModel:
    """A trained model from an export folder or a run directory (``checkpoint``/``ema_rate`` for a run;
    ``posthoc_sigma``: the run's post-hoc EMA of that relative length, ``checkpoint`` then the time)."""
    if isinstance(source, Path) or not str(source).startswith("s3://"):
        if not Path(source).is_dir():
            raise ValueError(f"model: {str(source)!r} does not exist or is not a folder; expected an export folder "
                             "(launch/export.py) or a training run directory")
        if is_export(source):
            network, config = load_pretrained(source, device=device, dtype=dtype, verify=verify)
            objective = config.objective
            if objective is None:  # no parameters of its own (or an export made before they were written)
                objective = objective_from_state(config.diffusion, {}, f"{source}/{CONFIG_FILE}").to(device)
            src = {"kind": "export", "path": str(source), "images_seen": config.images_seen,
                   "ema_rate": config.ema_rate}
            return TrainedModel(network, objective, config.diffusion, src, config)
    if posthoc_sigma is not None:
        if ema_rate is not None:
            raise ValueError("ema_rate and posthoc_sigma: give one source of weights, not both")
        model = load_posthoc_model(str(source), posthoc_sigma, checkpoint, device=device)
    else:
        model = load_checkpoint_model(str(source), checkpoint, ema_rate, device=device)
    if dtype != torch.float32:
        model.network.to(dtype)
        model.objective.to(dtype)
    return model
