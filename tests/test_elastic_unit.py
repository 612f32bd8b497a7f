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


@pytest.mark.parametrize("old,new", [((2, 1), (1, 1)), ((1, 1), (3, 1)), ((2, 2), (3, 1)), ((1, 2), (2, 2)),
                                     ((2, 1), (2, 2))])
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


# ---------------------------------------------------------------------------------------------
# DeepSpeed state and EMA: W=2 -> W'=3 gloo processes, no Ray (tests/elastic_ranks.py)


def _spawn(mode: str, world: int, run) -> None:
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(root / "tests" / "elastic_ranks.py"), mode, str(world), str(run), str(port)],
                          cwd=root, env={**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(root)},
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]


def test_zero_partitions_adam_state_and_ema_are_re_split_bitwise(tmp_path):
    """ZeRO 0-3: what 3 ranks hold after loading a 2-rank checkpoint (full fp32 weights, working
    weights, Adam's moments and step, both EMAs, the loss scale), gathered, equals bitwise what
    the 2 ranks held when they saved it; a training step then runs at the new size."""
    import torch
    from elastic_ranks import STAGES

    _spawn("save", 2, tmp_path)
    _spawn("load", 3, tmp_path)
    for stage in STAGES:
        before = torch.load(tmp_path / f"save-{stage}.pt", weights_only=True)
        after = torch.load(tmp_path / f"load-{stage}.pt", weights_only=True)
        assert after["next_loss_finite"] and before["step"] == after["step"] == 3.0, stage
        assert after["loss_scale"] == before["loss_scale"]
        for key in ("fp32", "working", "exp_avg", "exp_avg_sq"):
            assert before[key].keys() == after[key].keys()
            for name, t in before[key].items():
                assert torch.equal(t, after[key][name]), (stage, key, name)
        assert all(t.abs().sum() > 0 for t in before["exp_avg_sq"].values())  # no trivially zero moment
        for rate in (0.9, 0.5):
            for name, t in before["ema"][rate].items():
                assert torch.equal(t, after["ema"][rate][name]), (stage, rate, name)


def test_fp16_loss_scaler_state_round_trips_through_a_checkpoint_file(tmp_path):
    """DeepSpeed's dynamic loss scaler, as it lies in a ZeRO optimizer file, comes back from our
    weights-only loader with every field (scale, iteration, last overflow, hysteresis, window)."""
    import torch
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler

    from pipeline.train.elastic import read_rank_files

    scaler = DynamicLossScaler(init_scale=2.0**16, scale_window=4, min_scale=1, delayed_shift=2,
                               consecutive_hysteresis=False)
    scaler.cur_scale, scaler.cur_iter, scaler.last_overflow_iter, scaler.cur_hysteresis = 2.0**13, 37, 30, 1
    sd = {"loss_scaler": scaler, "dynamic_loss_scale": True, "overflow": False, "clip_grad": 1.0, "zero_stage": 2}
    torch.save({"optimizer_state_dict": sd}, tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    torch.save({"param_shapes": []}, tmp_path / "mp_rank_00_model_states.pt")
    _, (back,) = read_rank_files(str(tmp_path))
    assert isinstance(back["loss_scaler"], DynamicLossScaler) and back["dynamic_loss_scale"] is True
    assert vars(back["loss_scaler"]) == vars(scaler)
