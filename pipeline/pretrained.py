"""Load an exported model folder: ``model.safetensors`` + ``config.json``, nothing else.

A serving process needs only this module (torch, safetensors and the network definitions):
it imports neither DeepSpeed nor Ray, and reads no pickle. ::

    from pipeline import load_pretrained

    model, config = load_pretrained("exports/cifar10-ema0.9999")
    eps = model(x_t, t)                        # the model callable of pipeline.diffusion
    config.diffusion.schedule, config.diffusion.timesteps, config.class_names

The folder is written by :mod:`pipeline.export` (``launch/export.py``). ``config.json`` records
the network's complete architecture, the diffusion process it was trained for, the image
resolution, the class names and where the weights came from (run, checkpoint, EMA rate), plus
the sha256 of the weights file, which is checked on every load.

An objective with its own learned parameters (VDM's learned noise schedule gamma) is exported
with them in ``objective.safetensors`` (sha256 in ``config.json`` under ``objective_weights``);
``load_pretrained`` restores it as ``config.objective``, the module a sampler needs
(``pipeline.loading.load_model`` wraps this loader and a run checkpoint's into one).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.config import DiffusionConfig

__all__ = [
    "CONFIG_FILE",
    "EXPORT_FORMAT",
    "FORMAT_VERSION",
    "OBJECTIVE_FILE",
    "WEIGHTS_FILE",
    "PretrainedConfig",
    "load_objective",
    "load_pretrained",
    "model_config_dict",
    "objective_from_state",
    "read_export_config",
    "read_weights",
]

EXPORT_FORMAT = "diffusion-pipeline-export"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
OBJECTIVE_FILE = "objective.safetensors"  # the objective's own parameters, when it has any
CONFIG_FILE = "config.json"


@dataclass(frozen=True)
class PretrainedConfig:
    """What an export says about its model, typed."""

    model: Any  # pipeline.models.UNetConfig (or ClassifierConfig): the complete architecture
    diffusion: DiffusionConfig  # the process and parameterisation the network was trained for
    resolution: int
    class_names: tuple[str, ...] | None  # None: unconditional, or the names were not available at export
    ema_rate: float
    images_seen: int
    sampling: dict[str, Any]  # default sampler settings (the run's evaluation settings)
    source: dict[str, Any]  # run, checkpoint, hashes: where the weights came from
    raw: dict[str, Any]  # config.json as read
    # the training objective with its exported parameters (VDM's learned schedule), in eval mode;
    # None when the objective has no parameters or the export does not hold them
    objective: nn.Module | None = None

    @property
    def num_classes(self) -> int:
        return int(getattr(self.model, "num_classes", 0) or 0)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_export_config(folder: str | Path) -> dict[str, Any]:
    """``config.json`` of an export folder, checked for the format; ValueError naming the problem."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"model folder: {str(folder)!r} does not exist or is not a folder; "
                         f"expected a folder written by launch/export.py")
    path = folder / CONFIG_FILE
    if not path.is_file():
        hint = " (it looks like a diffusers folder: load it with diffusers)" if (folder / "model_index.json").is_file() \
            else ""
        raise ValueError(f"model folder: {str(folder)!r} has no {CONFIG_FILE}{hint}; expected a folder written by "
                         f"launch/export.py --format native")
    try:
        doc = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != EXPORT_FORMAT:
        got = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise ValueError(f"{path}: format {got!r} is not allowed; expected {EXPORT_FORMAT!r}")
    if doc.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {doc.get('format_version')!r} is not supported; "
                         f"this library reads version {FORMAT_VERSION}")
    for key in ("model", "diffusion", "weights"):
        if not isinstance(doc.get(key), dict):
            raise ValueError(f"{path}: field {key!r} is missing or not an object")  # noqa: TRY004 - bad input
    return doc


def read_weights(folder: str | Path, doc: dict[str, Any] | None = None, verify: bool = True, *,
                 key: str = "weights") -> dict[str, torch.Tensor]:
    """The tensors of ``model.safetensors``; with ``verify`` its sha256 must match ``config.json``.
    ``key="objective_weights"``: those of the objective's parameters file instead."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    doc = read_export_config(folder) if doc is None else doc
    record = doc.get(key)
    if not isinstance(record, dict):
        raise ValueError(f"{folder / CONFIG_FILE}: field {key!r} is missing or not an object")  # noqa: TRY004
    path = folder / record.get("file", WEIGHTS_FILE if key == "weights" else OBJECTIVE_FILE)
    if not path.is_file():
        raise ValueError(f"model folder: {str(folder)!r} has no weights file {path.name}")
    if verify:
        expected = record.get("sha256")
        actual = _sha256(path)
        if expected != actual:
            raise ValueError(f"{path}: the file is corrupted or was replaced: its sha256 {actual} differs from "
                             f"{expected} recorded in {CONFIG_FILE}; export the model again")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable safetensors file ({exc}); export the model again") from None


def load_pretrained(folder: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                    verify: bool = True) -> tuple[nn.Module, PretrainedConfig]:
    """``(model, config)`` from an export folder: the network in eval mode with its weights frozen,
    on ``device`` in ``dtype``, ready to be passed to a sampler (``model(x, t, y=None)``)."""
    from pipeline.models import build_model_from_dict

    doc = read_export_config(folder)
    state = read_weights(folder, doc, verify=verify)
    try:
        with torch.device("meta"):  # the weights come from the file: skip initialisation
            model = build_model_from_dict(dict(doc["model"]))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{Path(folder) / CONFIG_FILE}: field 'model' does not describe a network: {exc}") from None
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise ValueError(f"{Path(folder) / WEIGHTS_FILE}: the weights do not fit the network in {CONFIG_FILE}: "
                         f"{str(exc).splitlines()[0]}") from None
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"{Path(folder) / WEIGHTS_FILE}: no values for {left[:5]}")
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    try:
        diffusion = DiffusionConfig.model_validate(doc["diffusion"])
    except ValueError as exc:
        raise ValueError(f"{Path(folder) / CONFIG_FILE}: field 'diffusion' is not valid: {exc}") from None
    objective = load_objective(folder, doc, diffusion, verify=verify)
    if objective is not None:
        objective = objective.to(device=device, dtype=dtype).eval().requires_grad_(False)
    names = doc.get("class_names")
    config = PretrainedConfig(
        model=model.config,
        diffusion=diffusion,
        resolution=int(doc["resolution"] if "resolution" in doc else getattr(model.config, "image_size", 0)),
        class_names=tuple(names) if names is not None else None,
        ema_rate=float(doc.get("ema_rate", float("nan"))),
        images_seen=int(doc.get("images_seen", -1)),
        sampling=dict(doc.get("sampling") or {}),
        source=dict(doc.get("source") or {}),
        raw=doc,
        objective=objective,
    )
    return model, config


def objective_from_state(diffusion: DiffusionConfig | dict[str, Any], state: dict[str, torch.Tensor],
                         where: str) -> nn.Module:
    """The registry's objective module with its own parameters loaded strictly from ``state``, in eval mode.

    An objective without parameters must get an empty ``state``; one with parameters all of them
    (ValueError naming the keys, or saying the weights are missing, otherwise)."""
    from pipeline.diffusion.registry import build_objective

    d = diffusion if isinstance(diffusion, DiffusionConfig) else DiffusionConfig.model_validate(dict(diffusion))
    with torch.random.fork_rng(devices=[]):  # initial values are replaced; leave the caller's RNG alone
        torch.manual_seed(0)
        objective = build_objective(d.objective, d.objective_options())
    if not list(objective.parameters()):
        if state:
            raise ValueError(f"{where}: field 'objective_weights' / objective weights {sorted(state)[:3]} are not "
                             f"allowed for objective {d.objective!r}, which has no parameters of its own")
        return objective.eval()
    if not state:
        raise ValueError(f"{where}: objective {d.objective!r} has trained parameters of its own (e.g. a learned "
                         "noise schedule) but it holds no objective weights (objective.safetensors; exports made "
                         "before they were written lack them): export the run again with launch/export.py")
    try:
        objective.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{where}: the objective weights do not fit diffusion.options: "
                         f"{str(exc).splitlines()[0]}") from None
    return objective.eval()


def load_objective(folder: str | Path, doc: dict[str, Any], diffusion: DiffusionConfig, *,
                   verify: bool = True) -> nn.Module | None:
    """The training objective with the export's ``objective_weights`` (VDM's learned schedule), in
    eval mode; None when the export holds none (the objective has no parameters, or an older export)."""
    if not doc.get("objective_weights"):
        return None
    state = read_weights(folder, doc, verify=verify, key="objective_weights")
    where = str(Path(folder) / OBJECTIVE_FILE)
    return objective_from_state(diffusion, state, where).requires_grad_(False)


def model_config_dict(config: Any) -> dict[str, Any]:
    """``dataclasses.asdict`` of a network config, JSON-ready (tuples as lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))
