"""Elastic resume without Ray: the data reader's re-split of the epochs in progress (real shards,
real keys), and DeepSpeed's ZeRO 1-3 partitions, the EMA slices and Adam's state re-partitioned
from W to W' gloo processes (real DeepSpeed engines, compared bitwise with what was saved)."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from pipeline.data.prepare import prepare_dataset
from pipeline.data.reader import ShardReader

N = 53  # samples: 7 shards of 7 and one of 4, so readers' shares and epochs end unevenly


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("data") / "shapes")
    prepare_dataset("builtin:shapes10", out, shard_size=7, num_samples=N, workers=0, progress=False)
    return out


def _take(reader: ShardReader, n: int) -> list[str]:
    out: list[str] = []
    if n:
        for _, _, keys in reader:
            out += keys
            if len(out) >= n:
                break
    return out


def _reader(dataset, rank, world, workers, **kw):
    return ShardReader(dataset, rank=rank, world_size=world, batch_size=1, loader_workers=workers, shuffle_buffer=4,
                       seed=3, with_keys=True, **kw)


def _by_epoch(reader: ShardReader, last: int) -> dict[int, list[str]]:
    """Keys by the epoch they were read in, until every loader worker has read past epoch ``last``
    (a batch's epoch is that of the worker whose position it advanced)."""
    out: dict[int, list[str]] = {}
    before = reader.state_dict()["workers"]
    done = set()
    for _, _, keys in reader:
        now = reader.state_dict()["workers"]
        w = next(i for i in range(len(now)) if now[i] != before[i])
        out.setdefault(now[w]["epoch"], []).extend(keys)
        if now[w]["epoch"] > last:
            done.add(w)
        if len(done) == len(now):
            return out
        before = now
    raise AssertionError("unreachable: the reader is endless")


@pytest.mark.parametrize("old,new", [((2, 1), (1, 1)), ((1, 1), (3, 1)), ((2, 2), (3, 1)), ((1, 2), (2, 2))])
def test_resplit_reads_each_sample_of_the_interrupted_epochs_exactly_once(dataset, old, new):
    """W ranks x L loader workers read some samples, W' x L' continue: over the epochs in
    progress every key is read exactly once (a second change of world size, while the first
    carry is being read, is covered too); afterwards the new readers read whole epochs."""
    (w_old, l_old), (w_new, l_new) = old, new
    everything = Counter(f"{i:09d}" for i in range(N))
    seen: Counter = Counter()
    olds = [_reader(dataset, r, w_old, l_old) for r in range(w_old)]
    for i, r in enumerate(olds):
        seen.update(_take(r, 9 + 2 * i))  # ranks at different positions
    states = [json.loads(json.dumps(r.state_dict())) for r in olds]
    news = [_reader(dataset, r, w_new, l_new) for r in range(w_new)]
    for r in news:
        r.load_resplit(states)
    carry = news[0].carry
    left = sum(b - a for a, b in carry["epochs"]["0"])
    assert left == N - sum(seen.values()) and carry["last"] == 0
    # back to the first world size after part of the carry was read: a carry of a carry
    for r in news:
        seen.update(_take(r, left // (2 * w_new * l_new)))
    states2 = [json.loads(json.dumps(r.state_dict())) for r in news]
    assert all(s["carry"] == carry for s in states2)
    thirds = [_reader(dataset, r, w_old, l_old) for r in range(w_old)]
    for r in thirds:
        r.load_resplit(states2)
    assert sum(b - a for a, b in thirds[0].carry["epochs"]["0"]) == N - sum(seen.values())
    later = Counter()
    for r in thirds:
        keys = _by_epoch(r, 1)
        seen.update(keys[0])
        later.update(keys[1])
        assert r.state_dict()["carry"] is None  # every worker is past the carried epoch
    assert seen == everything  # the interrupted epoch: none lost, none twice
    assert later == everything  # the next epoch: a plain epoch at the new world size


def test_resplit_refuses_another_dataset_or_seed(dataset):
    states = [json.loads(json.dumps(_reader(dataset, r, 2, 1).state_dict())) for r in range(2)]
    with pytest.raises(ValueError, match="seed"):
        ShardReader(dataset, batch_size=1, seed=4, shuffle_buffer=4).load_resplit(states)
    with pytest.raises(ValueError, match="expected rank 0 of 2"):
        _reader(dataset, 0, 1, 1).load_resplit(states[::-1])
