"""Fine-tuning: initialise a run's network (and so its EMA) from trained weights (``train.init_from``).

The source is anything :func:`pipeline.loading.load_model` reads: an export folder (this project's,
or one written by ``launch/convert.py`` from openai's released checkpoints) or a run directory with
a checkpoint and an EMA rate. Loading is strict: the source's network state must have exactly the
keys and shapes of the configured network, or the error names every missing, unexpected and
mis-shaped key. The one change allowed is in the class embedding, handled explicitly and logged:

- same classes: copied (when the source never trained its null class, i.e. it was trained without
  label dropout or converted from a checkpoint that has none, the log says that guidance needs
  this run's ``diffusion.label_dropout`` to train it);
- a source embedding without the null row (``num_classes`` rows for ``num_classes + 1``): copied,
  the null row set to zeros (no class contribution);
- an unconditional source, a class-conditional target: the embedding keeps its fresh initialisation.

Any other class-count change is an error. The objective's own parameters (VDM's learned
schedule) are loaded too, strictly. What was loaded is returned as a provenance record, which
the loop writes to ``<run>/init_from.json`` and the export copies into its model card.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import torch
from torch import nn

from pipeline.config import ExperimentConfig, InitFrom

__all__ = ["INIT_RECORD", "LABEL_KEY", "apply_init_from", "check_init_from", "init_state", "initialize_from"]

log = logging.getLogger(__name__)

INIT_RECORD = "init_from.json"  # in the run directory
LABEL_KEY = "label_embed.weight"


def _load(init: InitFrom):
    from pipeline.loading import load_model

    try:
        return load_model(init.path, checkpoint=init.checkpoint, ema_rate=init.ema_rate)
    except (ValueError, FileNotFoundError) as exc:
        raise ValueError(f"train.init_from: {init.path!r} cannot be loaded: {exc}") from None


def _state_digest(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].detach().to(torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def _adapt_classes(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor],
                   source_trained_null: bool) -> tuple[dict[str, torch.Tensor], str | None]:
    """The source state with its class embedding fitted to the target's, and what was done (None: nothing)."""
    src, tgt = source.get(LABEL_KEY), target.get(LABEL_KEY)
    if src is None and tgt is None:
        return source, None
    if tgt is None:
        raise ValueError(f"train.init_from: the source is class-conditional ({src.shape[0] - 1} classes + null, "
                         f"key {LABEL_KEY}) but the configured network is unconditional; set "
                         f"model.overrides.num_classes={src.shape[0] - 1} or start from an unconditional model")
    if src is None:
        return {**source, LABEL_KEY: tgt.clone()}, (
            f"the source is unconditional: the class embedding ({tgt.shape[0] - 1} classes + null) starts from "
            "its fresh initialisation")
    if src.shape[1] != tgt.shape[1]:
        return source, None  # a width mismatch: reported with the other mis-shaped keys
    if src.shape[0] == tgt.shape[0]:
        if source_trained_null:
            return source, None
        return source, (f"the source's null class (row {tgt.shape[0] - 1}) was never trained; classifier-free "
                        "guidance needs this run's diffusion.label_dropout > 0 to train it")
    if src.shape[0] == tgt.shape[0] - 1:
        return {**source, LABEL_KEY: torch.cat([src, src.new_zeros(1, src.shape[1])])}, (
            f"added the null class: {src.shape[0]} class rows copied, null row {src.shape[0]} set to zeros")
    raise ValueError(f"train.init_from: key {LABEL_KEY}: the source has {src.shape[0] - 1} classes + null, the "
                     f"configured network {tgt.shape[0] - 1} + null; a different class count is not allowed "
                     "(only adding the null class, or conditioning an unconditional model)")


def _check_fit(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor], what: str) -> None:
    missing = sorted(set(target) - set(source))
    extra = sorted(set(source) - set(target))
    wrong = sorted(f"{k}: {tuple(source[k].shape)} (configured {tuple(target[k].shape)})"
                   for k in set(source) & set(target) if source[k].shape != target[k].shape)
    problems = []
    if missing:
        problems.append(f"missing key(s) {missing}")
    if extra:
        problems.append(f"unexpected key(s) {extra}")
    if wrong:
        problems.append(f"mis-shaped key(s) {wrong}")
    if problems:
        raise ValueError(f"train.init_from: the {what} does not fit the configured one: {'; '.join(problems)}; "
                         "make model.* describe the source's network")


def init_state(init: InitFrom, net: nn.Module, objective: nn.Module | None = None
               ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
    """``(network state, objective state, provenance)`` from ``init``, fitted to ``net`` (strict)."""
    loaded = _load(init)
    target = net.state_dict()
    source = {k: v.detach().to(torch.float32).cpu() for k, v in loaded.network.state_dict().items()}
    trained_null = bool(loaded.diffusion.label_dropout > 0)
    source, note = _adapt_classes(source, target, trained_null)
    _check_fit(source, target, "source network")
    objective_state: dict[str, torch.Tensor] = {}
    if objective is not None and list(objective.parameters()):
        objective_state = {k: v.detach().to(torch.float32).cpu() for k, v in loaded.objective.state_dict().items()}
        _check_fit(objective_state, objective.state_dict(), "source objective's parameters")
    record = {"path": init.path, "checkpoint": init.checkpoint, "ema_rate": init.ema_rate,
              "source": {k: v for k, v in loaded.source.items() if isinstance(v, (str, int, float, type(None)))},
              "diffusion": loaded.diffusion.model_dump(mode="json"), "classes": note,
              "network_sha256": _state_digest(source), "num_tensors": len(source)}
    return source, objective_state, record


def initialize_from(module: nn.Module, cfg: ExperimentConfig) -> dict[str, Any] | None:
    """Load ``cfg.train.init_from`` into a TrainModule's ``net`` (and ``objective`` parameters), before the
    engine and the EMA are built from it; returns the provenance record (None without ``init_from``)."""
    init = cfg.train.init_from
    if init is None:
        return None
    state, objective_state, record = init_state(init, module.net, getattr(module, "objective", None))
    with torch.no_grad():
        module.net.load_state_dict(state, strict=True)
        if objective_state:
            module.objective.load_state_dict(objective_state, strict=True)
    log.info("train.init_from: initialised the network from %s (%s)%s", init.path, record["source"].get("kind"),
             f"; {record['classes']}" if record["classes"] else "")
    if record["classes"]:
        log.warning("train.init_from: %s", record["classes"])
    return record


def check_init_from(cfg: ExperimentConfig) -> None:
    """Before any worker starts: the source loads and fits the configured network (ValueError otherwise)."""
    if cfg.train.init_from is None:
        return
    from pipeline.models import build_model_from_config
    from pipeline.train.objective import TrainModule

    with torch.random.fork_rng(devices=[]):
        module = TrainModule(build_model_from_config(cfg.model), cfg.diffusion)
    init_state(cfg.train.init_from, module.net, module.objective)


def apply_init_from(module: nn.Module, cfg: ExperimentConfig, run: Any, *, write_record: bool) -> None:
    """The training loop's one call: :func:`initialize_from` without moving the global RNG, and (on
    rank 0) the provenance record written to ``<run>/init_from.json``."""
    import json

    if cfg.train.init_from is None:
        return
    with torch.random.fork_rng(devices=[]):
        record = initialize_from(module, cfg)
    if write_record:
        run.write_text(INIT_RECORD, json.dumps(record, indent=2) + "\n")
