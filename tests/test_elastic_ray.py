"""Elastic resume under real Ray Train + DeepSpeed (gloo): a run stopped at a committed checkpoint
continues with another number of workers: ZeRO-3, from 2 workers to 1 (a lost node). ZeRO-2 2 -> 1
and ZeRO-3 1 -> 2 pass here too (add ``(2, 2, 1)``, ``(3, 1, 2)`` to the parameters), at about a
minute each; they are left out to keep the suite's time.

The epoch in progress is re-split: over the two runs every sample key of that epoch is consumed
exactly once (keys from the dataset's own shards, positions from each run's committed reader
states). The re-partitioned weights, Adam state and EMA are compared bitwise in
tests/test_elastic_unit.py (no Ray).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from test_train_unit import TINY

from pipeline.config import load_config
from pipeline.data.reader import epoch_plan, iter_dataset
from pipeline.train.checkpoint import committed_checkpoints
from pipeline.train.ray_launch import init_ray, run_training

pytestmark = pytest.mark.slow

EPOCH = 64  # samples in the dataset: 8 shards of 8


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    from pipeline.data.prepare import prepare_dataset

    out = tmp_path_factory.mktemp("data") / "shapes"
    prepare_dataset("builtin:shapes10", str(out), shard_size=8, num_samples=EPOCH, workers=0, progress=False)
    return str(out)


def _cfg(dataset: str, run: Path, workers: int, total: int, stage: int):
    return load_config(None, [*TINY, f"data.url={dataset}", f"train.run_dir={run}", f"train.num_workers={workers}",
                              "train.micro_batch=4", f"train.zero_stage={stage}", "train.checkpoint_every_images=1000",
                              f"train.total_images={total}", "train.keep_last=10", "data.shuffle_buffer=8"])


@pytest.fixture(scope="module")
def ray_session(dataset, tmp_path_factory):
    import ray

    init_ray(_cfg(dataset, tmp_path_factory.mktemp("unused"), 2, 8, 2))
    yield
    ray.shutdown()


def _consumed(manifest: dict, counts: np.ndarray, seed: int, buffer: int, epoch: int) -> list[int]:
    """Global sample ids each rank's reader consumed in ``epoch`` by the time of ``manifest``."""
    starts = np.concatenate([[0], np.cumsum(counts)])
    out: list[int] = []
    states = [r["state"]["data"] for r in manifest["ranks"]]
    for rank, st in enumerate(states):
        for worker, w in enumerate(st["workers"]):
            if w["epoch"] < epoch:
                continue
            plan = epoch_plan(counts, seed, epoch, rank, len(states), worker, len(st["workers"]), buffer, st.get("carry"))
            ids = plan.read_ids(starts)
            out += (ids if w["epoch"] > epoch else ids[plan.order[:w["position"]]]).tolist()
    return out


@pytest.mark.parametrize("stage,before,after", [(3, 2, 1)])
def test_resume_with_another_worker_count_reads_the_epoch_once(ray_session, dataset, tmp_path, stage, before, after):
    run = tmp_path / "run"
    first = 24 if before == 2 else 16  # mid-epoch; the rest of the epoch is a multiple of the new global batch
    run_training(_cfg(dataset, run, before, first, stage))
    run_training(_cfg(dataset, run, after, EPOCH, stage))
    ckpts = committed_checkpoints(str(run))
    assert [c.images_seen for c in ckpts] == [first, EPOCH]
    assert [c.world_size for c in ckpts] == [before, after]
    losses = [json.loads(line)["loss"] for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) >= EPOCH // 8 and all(math.isfinite(x) for x in losses)
    cfg = _cfg(dataset, run, after, EPOCH, stage)
    keys = [k for _, _, batch in iter_dataset(dataset, batch_size=EPOCH) for k in batch]  # manifest order = ids
    counts = np.full(EPOCH // 8, 8)
    seen = Counter(keys[i] for c in ckpts
                   for i in _consumed(c.manifest, counts, cfg.data.seed, cfg.data.shuffle_buffer, 0))
    assert seen == Counter(keys)  # the interrupted epoch: each sample once, none lost
