"""Inception features of uint8 images, through torch-fidelity's feature extractors."""

from __future__ import annotations

import functools
from collections.abc import Iterable

import numpy as np
import torch
from torch_fidelity.utils import create_feature_extractor

from evaluation.inception import ExtractorSource
from evaluation.metrics import LOGITS, POOL

__all__ = ["extract_features", "feature_layers", "get_extractor"]


def feature_layers(source: ExtractorSource) -> tuple[str, ...]:
    """The layers one pass extracts: pool3 always, logits when the extractor has a head."""
    return (POOL, LOGITS) if source.has_logits else (POOL,)


@functools.lru_cache(maxsize=2)
def _cached_extractor(name: str, weights_path: str, layers: tuple[str, ...], device: str) -> torch.nn.Module:
    extractor = create_feature_extractor(
        name, list(layers), cuda=False, feature_extractor_weights_path=weights_path, verbose=False
    )
    return extractor.to(device)


def get_extractor(source: ExtractorSource, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The feature extractor of ``source``, built once per process and device."""
    return _cached_extractor(source.name, source.weights_path, feature_layers(source), str(device))


@torch.no_grad()
def extract_features(
    source: ExtractorSource,
    batches: Iterable[np.ndarray],
    batch_size: int = 64,
    device: str | torch.device = "cpu",
) -> dict[str, np.ndarray]:
    """Features of uint8 images given as (B, H, W, 3) or (B, H, W, 1) arrays.

    Returns ``{"2048": (N, 2048) float32, ["logits_unbiased": (N, 1008) float32]}``.
    """
    extractor = get_extractor(source, device)
    layers = feature_layers(source)
    chunks: dict[str, list[np.ndarray]] = {layer: [] for layer in layers}
    for batch in batches:
        batch = np.asarray(batch)
        if batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[-1] not in (1, 3):
            raise ValueError(f"extract_features: expected uint8 (B, H, W, 1|3) images, got {batch.dtype} {batch.shape}")
        for start in range(0, batch.shape[0], batch_size):
            x = torch.from_numpy(np.ascontiguousarray(batch[start : start + batch_size])).permute(0, 3, 1, 2)
            if x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            out = extractor(x.contiguous().to(device))
            for layer, value in zip(layers, out):
                chunks[layer].append(value.float().cpu().numpy())
    if not chunks[POOL]:
        raise ValueError("extract_features: no images")
    return {layer: np.concatenate(parts) for layer, parts in chunks.items()}
