"""Data: storage URLs (local, s3://), WebDataset shard writing and resumable streaming.

Public entry points: :class:`~pipeline.data.reader.ShardReader`,
:func:`~pipeline.data.shards.read_manifest`, :func:`~pipeline.data.prepare.prepare_dataset`
and the :mod:`~pipeline.data.storage` functions. Submodules import lazily, so ``import
pipeline.data.storage`` does not pull in torch or Ray.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ShardReader", "CorruptDataError", "ShardIntegrityError", "read_manifest", "prepare_dataset", "verify_dataset"]

_EXPORTS = {
    "ShardReader": "pipeline.data.reader",
    "CorruptDataError": "pipeline.data.reader",
    "ShardIntegrityError": "pipeline.data.shards",
    "read_manifest": "pipeline.data.shards",
    "verify_dataset": "pipeline.data.shards",
    "prepare_dataset": "pipeline.data.prepare",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'pipeline.data' has no attribute {name!r}")
