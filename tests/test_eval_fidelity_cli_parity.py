"""Our FID / KID / IS / precision-recall equal what torch-fidelity's own CLI (`fidelity`) reports on
the same two PNG folders with the same weights file (benchmarks/fidelity_parity.py, small)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from fidelity_parity import compare


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_our_metrics_equal_torch_fidelity_cli_on_the_same_folders(tmp_path):
    table = compare(tmp_path, count=16, kid_subsets=5, kid_subset_size=8, splits=2)
    # Same network, same feature-level functions; only the batch composition differs (float32 convs),
    # so the values agree to ~1e-5 relative; precision/recall are counts over 16 images: exact.
    for metric in ("fid", "kid", "is"):
        assert table[metric]["rel_diff"] < 1e-4, (metric, table[metric])
    for metric in ("precision", "recall"):
        assert table[metric]["abs_diff"] == 0.0, (metric, table[metric])
    assert table["fid"]["ours"] > 1.0  # the half-noisy set really differs from the real one
    assert 0 < table["precision"]["ours"] < 1
