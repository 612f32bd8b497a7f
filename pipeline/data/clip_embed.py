"""CLIP image and text embeddings with open_clip, from a local weights file (never a download).

``load_embedder(model_name, weights_path) -> Embedder``; ``Embedder.embed_images`` and
``Embedder.embed_texts`` return L2-normalised float32 ``[N, d]`` tensors, computed in eval mode
under ``no_grad`` in fixed chunks, so the same input gives the same bits in any process.

``model_name`` is one of:

- a small model of this project (:data:`TINY_MODELS`: ``shapes-tiny`` for the demo,
  ``shapes-micro`` for tests), built with open_clip's own ``CLIP`` class from the config dict
  here, trained on a dataset's image-caption pairs by :mod:`pipeline.data.clip_train`
  (``launch/train_clip.py``);
- any model name open_clip lists (``open_clip.list_models()``, e.g. ``ViT-B-32``), built with
  ``pretrained=None`` (no download) and loaded from the weights file.

The weights file is a ``.safetensors`` (preferred) or a torch state dict loaded with
``weights_only=True``; local path or ``s3://``. Its sha256 is the embedder's identity
(``identity()``: name, model, weights_sha256, dim), recorded in ``dataset.json``.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["EMBEDDER_NAME", "TINY_MODELS", "Embedder", "build_clip", "load_embedder", "read_weights"]

EMBEDDER_NAME = "open_clip"
_CHUNK = 256  # images or captions per forward pass

# Small open_clip configs (the same keys as open_clip's model_configs/*.json) for 32x32 images.
# The text tower uses open_clip's SimpleTokenizer (its BPE vocabulary ships in the wheel), hence
# vocab_size 49408; captions here are short (at most 17 tokens), hence context_length 24.
TINY_MODELS: dict[str, dict[str, Any]] = {
    "shapes-tiny": {
        "embed_dim": 64,
        "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 96, "layers": 2, "head_width": 32},
        "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    },
    "shapes-micro": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
        "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    },
}
# Pixel normalisation of the small models: [0, 1] -> [-1, 1], the diffusion models' own range.
_TINY_MEAN_STD = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def build_clip(model_name: str) -> tuple[torch.nn.Module, Any, tuple, tuple, int]:
    """(open_clip model with random weights, tokenizer, mean, std, image size) of ``model_name``."""
    import open_clip

    if model_name in TINY_MODELS:
        cfg = TINY_MODELS[model_name]
        model = open_clip.CLIP(**cfg)
        tokenizer = open_clip.SimpleTokenizer(context_length=cfg["text_cfg"]["context_length"])
        mean, std = _TINY_MEAN_STD
        size = int(cfg["vision_cfg"]["image_size"])
    elif model_name in open_clip.list_models():
        model = open_clip.create_model(model_name, pretrained=None)  # no pretrained tag: no download
        tokenizer = open_clip.get_tokenizer(model_name)
        pre = open_clip.get_model_preprocess_cfg(model)
        mean = tuple(pre.get("mean", open_clip.OPENAI_DATASET_MEAN))
        std = tuple(pre.get("std", open_clip.OPENAI_DATASET_STD))
        size = pre.get("size", 224)
        size = int(size[0] if isinstance(size, (tuple, list)) else size)
    else:
        raise ValueError(
            f"clip model: {model_name!r} is not allowed; use one of this project's small models "
            f"({', '.join(TINY_MODELS)}) or an open_clip model name (open_clip.list_models(), e.g. ViT-B-32)"
        )
    return model, tokenizer, mean, std, size


def read_weights(weights_path: str) -> tuple[dict[str, torch.Tensor], str]:
    """(state dict, sha256 of the file's bytes) of a local or s3:// weights file; never downloads."""
    from pipeline.data import storage

    if not weights_path:
        raise ValueError("clip weights: '' is not allowed; give a weights file (train one with launch/train_clip.py)")
    try:
        data = storage.read_bytes(weights_path)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"clip weights: {weights_path!r} does not exist; give a local .safetensors file (train one with "
            "python launch/train_clip.py --out FILE) or an open_clip checkpoint on disk; nothing is downloaded"
        ) from None
    sha = hashlib.sha256(data).hexdigest()
    if weights_path.endswith(".safetensors") or data[8:9] == b"{":  # safetensors: u64 header length, then JSON
        from safetensors.torch import load as load_safetensors

        try:
            state = load_safetensors(data)
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            raise ValueError(f"clip weights: {weights_path!r} is not a readable safetensors file ({exc})") from None
    else:
        try:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad file
            raise ValueError(f"clip weights: {weights_path!r} is neither safetensors nor a torch state dict ({exc})") from None
        state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise ValueError(f"clip weights: {weights_path!r} does not hold a state dict")
    return state, sha


class Embedder:
    """A loaded CLIP model: ``embed_images``, ``embed_texts``, ``identity()``, ``dim``."""

    def __init__(self, model_name: str, model: torch.nn.Module, tokenizer: Any, mean: Sequence[float],
                 std: Sequence[float], image_size: int, weights_sha256: str, device: str | torch.device = "cpu"):
        self.model_name, self.weights_sha256 = model_name, weights_sha256
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer, self.image_size = tokenizer, int(image_size)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        proj = getattr(model, "text_projection", None)
        out = getattr(proj, "out_features", None) or (proj.shape[1] if isinstance(proj, torch.Tensor) else None)
        self.dim = int(out or model.visual.output_dim)

    def identity(self) -> dict[str, Any]:
        return {"name": EMBEDDER_NAME, "model": self.model_name, "weights_sha256": self.weights_sha256, "dim": self.dim}

    def pixels(self, images: Any) -> torch.Tensor:
        """uint8 (N, H, W, 3) or float (N, 3, H, W) in [-1, 1] -> the model's normalised input."""
        x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
        if x.dtype == torch.uint8:
            if x.ndim != 4 or x.shape[-1] != 3:
                raise ValueError(f"images: uint8 images must be (N, H, W, 3), got {tuple(x.shape)}")
            x = x.permute(0, 3, 1, 2).float() / 255.0
        else:
            if x.ndim != 4 or x.shape[1] != 3:
                raise ValueError(f"images: float images must be (N, 3, H, W) in [-1, 1], got {tuple(x.shape)}")
            x = (x.float().cpu() + 1.0) / 2.0
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", antialias=True,
                              align_corners=False).clamp_(0.0, 1.0)
        return (x - self.mean) / self.std

    @torch.no_grad()
    def embed_images(self, images: Any) -> torch.Tensor:
        """L2-normalised image embeddings, float32 ``[N, d]`` on the CPU."""
        x = self.pixels(images)
        outs = [self.model.encode_image(x[i:i + _CHUNK].to(self.device)).float() for i in range(0, len(x), _CHUNK)]
        return _normalise(torch.cat(outs) if outs else torch.zeros(0, self.dim))

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised text embeddings, float32 ``[N, d]`` on the CPU."""
        if isinstance(texts, str):
            raise ValueError("texts: a single string is not allowed; give a list of captions")
        empty = [i for i, t in enumerate(texts) if not str(t).strip()]
        if empty:
            raise ValueError(f"texts: caption {empty[0]} is empty; every prompt must have words")
        outs = []
        for i in range(0, len(texts), _CHUNK):
            tokens = self.tokenizer([str(t) for t in texts[i:i + _CHUNK]]).to(self.device)
            outs.append(self.model.encode_text(tokens).float())
        return _normalise(torch.cat(outs) if outs else torch.zeros(0, self.dim))


def _normalise(z: torch.Tensor) -> torch.Tensor:
    return F.normalize(z.cpu().float(), dim=-1)


def load_embedder(model_name: str, weights_path: str, device: str | torch.device = "cpu") -> Embedder:
    """The CLIP model ``model_name`` with the weights in ``weights_path`` (see the module docstring)."""
    model, tokenizer, mean, std, size = build_clip(model_name)  # a bad name fails before reading the file
    state, sha = read_weights(weights_path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(
            f"clip weights: {weights_path!r} do not fit model {model_name!r} "
            f"({str(exc).splitlines()[0] if str(exc) else exc}); give the model name the file was trained as"
        ) from None
    return Embedder(model_name, model, tokenizer, mean, std, size, sha, device)


_CACHE: dict[tuple[str, str, float], Embedder] = {}


def cached_embedder(model_name: str, weights_path: str) -> Embedder:
    """``load_embedder`` once per process and file version (for Ray tasks that embed many shards)."""
    try:
        stamp = os.path.getmtime(weights_path)
    except OSError:
        stamp = 0.0  # s3:// or missing: load_embedder reports it
    key = (model_name, weights_path, stamp)
    if key not in _CACHE:
        _CACHE.clear()
        _CACHE[key] = load_embedder(model_name, weights_path)
    return _CACHE[key]
