"""Per-sample seeds of evaluation and of ``launch/sample.py`` (numpy only: no Ray, no torch).

Sample ``i`` of an evaluation with seed ``S`` is drawn from ``sample_seed(S, i)`` alone, so the
set of images does not depend on how many workers made it, nor on the batch sizes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["image_records", "sample_seed", "sample_seeds"]


def sample_seed(eval_seed: int, index: int) -> int:
    """The seed of sample ``index``: a 63-bit hash of (eval seed, index) (numpy SeedSequence)."""
    if index < 0:
        raise ValueError(f"index: {index!r} is not allowed; sample indices are >= 0")
    state = np.random.SeedSequence([int(eval_seed) & 0xFFFFFFFF, int(eval_seed) >> 32, int(index)]).generate_state(
        2, np.uint32
    )
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


def sample_seeds(eval_seed: int, indices: Sequence[int]) -> np.ndarray:
    """``sample_seed(eval_seed, i)`` for each index, as int64."""
    return np.array([sample_seed(eval_seed, int(i)) for i in indices], dtype=np.int64)


def image_records(seeds: Sequence[int], labels: Sequence[int] | None,
                  class_names: Sequence[str] | None) -> list[dict[str, Any]]:
    """samples.json's records (index, file, seed, label, class name) of the images drawn from ``seeds``,
    as ``launch/sample.py`` and the serving zip write them."""
    records = []
    for i, seed in enumerate(seeds):
        rec: dict[str, Any] = {"index": i, "file": f"{i:06d}.png", "seed": int(seed)}
        if labels is not None:
            rec["label"] = int(labels[i])
            if class_names:
                rec["class_name"] = class_names[int(labels[i])]
        records.append(rec)
    return records
