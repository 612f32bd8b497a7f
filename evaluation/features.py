"""Features of uint8 images, through torch-fidelity's feature extractors (Inception, DINOv2).

For sFID, a forward hook on torch-fidelity's Inception takes the spatial features of the same
pass that gives pool3 and logits: the output (after batch norm and ReLU) of ``Mixed_6d.branch1x1``,
which is the TF graph's ``mixed_6/conv`` (TF counts ``mixed`` = 5b, ..., ``mixed_6`` = 6d; see the
name map in :mod:`evaluation.inception`), first 7 of 192 channels, 17 x 17, flattened in TF's
(H, W, C) order as ADM's evaluator does: 2023 numbers per image (Nash et al. 2021).
This works for both Inception extractors, since the TorchScript one is converted to
torch-fidelity's network."""

from __future__ import annotations

import functools
from collections.abc import Iterable

import numpy as np
import torch
from torch_fidelity.utils import create_feature_extractor

from evaluation.inception import ExtractorSource
from evaluation.metrics import DINOV2, LOGITS, POOL, SPATIAL

__all__ = ["SFID_CHANNELS", "extract_features", "feature_layers", "get_extractor", "main_layer"]

SFID_CHANNELS = 7  # ADM's evaluator: mixed_6/conv[..., :7]


def _is_dinov2(source: ExtractorSource) -> bool:
    from evaluation.dinov2 import DINOV2_EXTRACTOR

    return source.name == DINOV2_EXTRACTOR


def main_layer(source: ExtractorSource) -> str:
    """The feature every image of this extractor has (pool3 for Inception, the CLS token for DINOv2)."""
    return DINOV2 if _is_dinov2(source) else POOL


def feature_layers(source: ExtractorSource) -> tuple[str, ...]:
    """The layers one pass extracts: pool3 and mixed_6/conv always, logits when the extractor has a head."""
    if _is_dinov2(source):
        return (DINOV2,)
    return (POOL, SPATIAL, LOGITS) if source.has_logits else (POOL, SPATIAL)


def _network_layers(source: ExtractorSource) -> tuple[str, ...]:
    return tuple(layer for layer in feature_layers(source) if layer != SPATIAL)  # SPATIAL comes from the hook


@functools.lru_cache(maxsize=2)
def _cached_extractor(name: str, weights_path: str, layers: tuple[str, ...], device: str) -> torch.nn.Module:
    extractor = create_feature_extractor(
        name, list(layers), cuda=False, feature_extractor_weights_path=weights_path, verbose=False
    )
    return extractor.to(device)


def get_extractor(source: ExtractorSource, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The feature extractor of ``source``, built once per process and device."""
    return _cached_extractor(source.name, source.weights_path, _network_layers(source), str(device))


@torch.no_grad()
def extract_features(
    source: ExtractorSource,
    batches: Iterable[np.ndarray],
    batch_size: int = 64,
    device: str | torch.device = "cpu",
) -> dict[str, np.ndarray]:
    """Features of uint8 images given as (B, H, W, 3) or (B, H, W, 1) arrays.

    Returns ``{"2048": (N, 2048), "mixed_6_conv": (N, 2023), ["logits_unbiased": (N, 1008)]}``
    (float32) for Inception, ``{"dinov2": (N, 1024)}`` for DINOv2.
    """
    extractor = get_extractor(source, device)
    layers = _network_layers(source)
    chunks: dict[str, list[np.ndarray]] = {layer: [] for layer in feature_layers(source)}
    hook = None
    if SPATIAL in chunks:
        def keep_spatial(module, inputs, output):  # (B, 192, 17, 17) -> (B, 17 * 17 * 7), TF's HWC order
            spatial = output[:, :SFID_CHANNELS].permute(0, 2, 3, 1).reshape(output.shape[0], -1)
            chunks[SPATIAL].append(spatial.float().cpu().numpy())

        hook = extractor.Mixed_6d.branch1x1.register_forward_hook(keep_spatial)
    try:
        _extract(extractor, layers, batches, batch_size, device, chunks)
    finally:
        if hook is not None:
            hook.remove()
    main = main_layer(source)
    if not chunks[main]:
        raise ValueError("extract_features: no images")
    return {layer: np.concatenate(parts) for layer, parts in chunks.items()}


def _extract(extractor, layers, batches, batch_size, device, chunks) -> None:
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
