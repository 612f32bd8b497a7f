"""ShardReader: order, per-rank shares, exact resume (1 and 2 ranks, 0 and 2 loader workers),
local/S3 parity, flips, and every bad-input case of the issue."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data import storage
from pipeline.data.prepare import prepare_dataset
from pipeline.data.reader import CorruptDataError, ShardReader, buffer_shuffle_order, worker_shards
from pipeline.data.shards import ShardIntegrityError

SHARDS, PER_SHARD = 5, 7
EPOCHS = 3


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("data") / "shapes")
    prepare_dataset("builtin:shapes10", out, shard_size=PER_SHARD, num_samples=SHARDS * PER_SHARD, workers=0, progress=False)
    return out


def _copy(src: str, dst: Path) -> str:
    for url in storage.list_prefix(src):
        storage.write_bytes(str(dst / Path(url).relative_to(src)), storage.read_bytes(url))
    return str(dst)


def _rewrite_manifest(root: str, edit) -> None:
    murl = storage.join(root, "dataset.json")
    doc = json.loads(storage.read_bytes(murl))
    edit(doc)
    storage.write_bytes(murl, json.dumps(doc).encode())


def _rewrite_shard(root: str, index: int, edit_samples, fix_sha: bool = True) -> None:
    """Rewrite shard ``index`` with ``edit_samples(list of sample dicts)``; record its new sha."""
    import hashlib
    import io

    import webdataset as wds
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    url = storage.join(root, f"shards/shard-{index:06d}.tar")
    samples = list(group_by_keys({**f, "__url__": url} for f in tar_file_iterator(io.BytesIO(storage.read_bytes(url)))))
    buf = io.BytesIO()
    with wds.TarWriter(buf, encoder=False, mtime=0) as sink:
        for s in edit_samples(samples):
            sink.write({k: v for k, v in s.items() if k != "__url__"})
    storage.write_bytes(url, buf.getvalue())
    if fix_sha:
        sha = hashlib.sha256(buf.getvalue()).hexdigest()
        _rewrite_manifest(root, lambda d: d["shards"][index].update(sha256=sha))


def _keys(reader: ShardReader, n_batches: int) -> list[list[str]]:
    out = []
    if n_batches == 0:
        return out
    for _, _, keys in reader:
        out.append(list(keys))
        if len(out) == n_batches:
            break
    return out


# ---------------------------------------------------------------------------------------------
# Order and shares


def test_buffer_shuffle_is_a_permutation_with_bounded_displacement():
    rng = np.random.default_rng(0)
    for n, b in [(1, 1), (10, 1), (50, 7), (30, 100)]:
        order = buffer_shuffle_order(n, b, rng.random(n))
        assert sorted(order.tolist()) == list(range(n))
        if b == 1:
            assert order.tolist() == list(range(n))
        # the k-th emitted sample has been read by then: read index <= k + buffer - 1
        assert all(order[k] <= k + b - 1 for k in range(n))


@pytest.mark.parametrize("world_size,workers", [(1, 1), (2, 1), (2, 2), (5, 1)])
def test_shares_are_disjoint_and_cover_each_epoch(world_size, workers):
    for epoch in range(4):
        shares = [worker_shards(SHARDS, 11, epoch, r, world_size, w, workers) for r in range(world_size) for w in range(workers)]
        flat = [s for share in shares for s in share]
        assert sorted(flat) == list(range(SHARDS)) and all(shares)
    perms = {tuple(worker_shards(SHARDS, 11, e, 0, 1, 0, 1)) for e in range(6)}
    assert len(perms) > 1  # shard order changes with the epoch


def test_ranks_cover_each_epoch_sample_by_sample(dataset):
    """Two ranks with two loader workers each: epoch 0's samples split disjointly and completely."""
    seen = {}
    for rank in range(2):
        reader = ShardReader(dataset, rank=rank, world_size=2, batch_size=1, loader_workers=2, shuffle_buffer=4, with_keys=True)
        seen[rank], done = [], set()
        for i, (_, _, keys) in enumerate(reader):
            worker = i % 2  # batches come round-robin from the two loader workers
            if reader.state_dict()["workers"][worker]["epoch"] == 0:
                seen[rank] += keys  # batch size 1: this sample belongs to epoch 0
            else:
                done.add(worker)
            if done == {0, 1}:
                break
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == [f"{i:09d}" for i in range(SHARDS * PER_SHARD)]


def test_epochs_repeat_the_data_in_a_new_order(dataset):
    reader = ShardReader(dataset, batch_size=SHARDS * PER_SHARD, shuffle_buffer=5, with_keys=True)
    e0, e1 = _keys(reader, 2)
    assert sorted(e0) == sorted(e1) == [f"{i:09d}" for i in range(SHARDS * PER_SHARD)]
    assert e0 != e1


# ---------------------------------------------------------------------------------------------
# Exact resume


def _epoch_len(rank: int, world_size: int, epoch: int) -> int:
    return sum(PER_SHARD for _ in worker_shards(SHARDS, 0, epoch, rank, world_size, 0, 1))


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("buffer", [1, 4])
def test_resume_in_process_around_every_boundary(dataset, world_size, buffer):
    """Interrupt at and beside every shard boundary of 3 epochs (epoch boundaries among them)."""
    for rank in range(world_size):
        total = sum(_epoch_len(rank, world_size, e) for e in range(EPOCHS))
        make = lambda: ShardReader(dataset, rank=rank, world_size=world_size, batch_size=1, shuffle_buffer=buffer, seed=0, with_keys=True)  # noqa: E731
        full = _keys(make(), total)
        boundaries = set(np.cumsum([_epoch_len(rank, world_size, e) for e in range(EPOCHS)]).tolist())
        assert boundaries & set(range(1, total)) and set(range(PER_SHARD, total, PER_SHARD)) - boundaries
        # every shard boundary (reads are 7 per shard) and its neighbours, epoch boundaries included
        cuts = sorted({c for b in range(PER_SHARD, total, PER_SHARD) for c in (b - 1, b, b + 1)} | {1, total - 1})
        for cut in cuts:
            first = make()
            head = _keys(first, cut)
            state = json.loads(json.dumps(first.state_dict()))
            second = make()
            second.load_state_dict(state)
            assert head + _keys(second, total - cut) == full, (rank, cut)


@pytest.mark.parametrize("world_size", [1, 2])
def test_resume_with_two_loader_workers(dataset, world_size):
    """2 DataLoader workers, batch 2: resume after cuts that leave a worker mid-shard, at a shard
    boundary and at an epoch boundary (found from the uninterrupted run's positions)."""
    for rank in range(world_size):
        make = lambda: ShardReader(  # noqa: E731
            dataset, rank=rank, world_size=world_size, batch_size=2, loader_workers=2, shuffle_buffer=1, with_keys=True
        )
        total = sum(_epoch_len(rank, world_size, e) for e in range(EPOCHS)) // 2
        reader = make()
        full, kinds = [], {}
        for _, _, keys in reader:
            full.append(list(keys))
            w = (len(full) - 1) % 2
            pos = reader.state_dict()["workers"][w]["position"]
            if pos % PER_SHARD:
                kinds.setdefault("mid-shard", len(full))
            elif pos and pos in (PER_SHARD, 2 * PER_SHARD) and "shard" not in kinds:
                kinds["shard"] = len(full)
            if reader.state_dict()["workers"][w]["epoch"] > 0 and "epoch" not in kinds:
                kinds["epoch"] = len(full)
            if len(full) == total:
                break
        assert set(kinds) == {"mid-shard", "shard", "epoch"}, kinds
        for kind, cut in sorted(kinds.items()) + [("odd", 5)]:
            first = make()
            head = _keys(first, cut)
            second = make()
            second.load_state_dict(json.loads(json.dumps(first.state_dict())))
            assert head + _keys(second, total - cut) == full, (rank, kind, cut)


def test_resume_with_corrupt_samples_keeps_order_and_counts(dataset, tmp_path):
    """Skipped samples do not shift the order: resumed keys and final counters match."""
    root = _copy(dataset, tmp_path / "d")

    def spoil(samples):
        samples[2]["png"] = b"junk"
        samples[5]["png"] = b"junk"
        return samples

    _rewrite_shard(root, 3, spoil)
    make = lambda: ShardReader(root, batch_size=2, shuffle_buffer=4, max_corrupt_fraction=0.2, with_keys=True)  # noqa: E731
    total = (3 * 33) // 2
    whole = make()
    full = _keys(whole, total)
    assert whole.counters["skipped"] == 6 and whole.counters["skipped_by_reason"] == {"bad_image": 6}
    for cut in (5, 16, 17, 33, 40):
        first = make()
        head = _keys(first, cut)
        second = make()
        second.load_state_dict(json.loads(json.dumps(first.state_dict())))
        assert head + _keys(second, total - cut) == full, cut
        assert second.counters == whole.counters


def test_reader_from_config(dataset):
    from pipeline.config import load_config

    cfg = load_config(None, [f"data.url={dataset}", "data.resolution=16", "data.hflip=false", "data.s3_max_attempts=2"])
    reader = ShardReader.from_config(cfg.data, rank=1, world_size=2, batch_size=3)
    assert (reader.resolution, reader.hflip, reader.rank, reader.settings.max_attempts) == (16, False, 1, 2)
    x, y = next(iter(reader))
    assert x.shape == (3, 3, 16, 16) and y.shape == (3,)


def test_resume_needs_the_same_layout(dataset):
    state = ShardReader(dataset, batch_size=2).state_dict()
    with pytest.raises(ValueError, match="world_size"):
        ShardReader(dataset, world_size=2, batch_size=2).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        ShardReader(dataset, seed=1, batch_size=2).load_state_dict(state)


# ---------------------------------------------------------------------------------------------
# Decoding


def test_batches_are_scaled_and_flipped(dataset):
    plain = ShardReader(dataset, batch_size=35, hflip=False, with_keys=True)
    flip = ShardReader(dataset, batch_size=35, hflip=True, with_keys=True)
    (x0, y0, k0), (x1, y1, k1) = next(iter(plain)), next(iter(flip))
    assert x0.dtype == torch.float32 and x0.shape == (35, 3, 32, 32) and y0.dtype == torch.int64
    assert x0.min() >= -1 and x0.max() <= 1 and x0.min() < -0.5 and x0.max() > 0.5
    assert k0 == k1 and torch.equal(y0, y1)
    same = [torch.equal(a, b) for a, b in zip(x0, x1, strict=True)]
    mirrored = [torch.equal(a.flip(-1), b) for a, b in zip(x0, x1, strict=True)]
    assert all(s or m for s, m in zip(same, mirrored, strict=True)) and 5 < sum(mirrored) < 30
    assert sorted(y0.tolist()) == sorted(int(k) % 10 for k in k0)  # shapes10: label = index mod 10


def test_one_ordered_pass_for_reference_statistics(dataset):
    from pipeline.data.reader import iter_dataset

    batches = list(iter_dataset(dataset, batch_size=8))
    assert [len(k) for _, _, k in batches] == [8, 8, 8, 8, 3]
    keys = [k for _, _, ks in batches for k in ks]
    assert keys == [f"{i:09d}" for i in range(35)]
    x_all = torch.cat([x for x, _, _ in batches])
    (x, _, k), = _keys_and_images(ShardReader(dataset, batch_size=35, hflip=False, with_keys=True))
    for j, key in enumerate(k):
        assert torch.equal(x[j], x_all[int(key)])


def _keys_and_images(reader):
    for batch in reader:
        return [batch]


def test_resize_to_another_resolution(dataset):
    x, _ = next(iter(ShardReader(dataset, batch_size=4, resolution=16)))
    assert x.shape == (4, 3, 16, 16)


def test_s3_streaming_matches_local(dataset, s3_bucket):
    import boto3

    client = boto3.client("s3")
    bucket, _ = storage.split_s3(s3_bucket)
    for url in storage.list_prefix(dataset):
        client.upload_file(url, bucket, "ds/" + str(Path(url).relative_to(dataset)))
    kw = dict(batch_size=5, shuffle_buffer=6, loader_workers=2, seed=3)
    local = [(x, y) for (x, y), _ in zip(ShardReader(dataset, **kw), range(10), strict=False)]
    remote_reader = ShardReader(s3_bucket + "/ds", **kw)
    remote = [(x, y) for (x, y), _ in zip(remote_reader, range(10), strict=False)]
    for (a, la), (b, lb) in zip(local, remote, strict=True):
        assert torch.equal(a, b) and torch.equal(la, lb)


# ---------------------------------------------------------------------------------------------
# Bad input


def _epoch_counters(root: str, n_batches: int = 1, **kw):
    reader = ShardReader(root, batch_size=1, with_keys=True, **kw)
    keys = [k for batch in _keys(reader, n_batches) for k in batch]
    return keys, reader.counters


def test_truncated_tar_is_skipped_and_counted(dataset, tmp_path):
    import hashlib

    from pipeline.data.shards import iter_shard_samples

    root = _copy(dataset, tmp_path / "d")
    url = storage.join(root, "shards/shard-000002.tar")  # keys 14..20
    data = storage.read_bytes(url)
    cut = data[: len(data) * 3 // 5 + 100]  # ends inside a member
    storage.write_bytes(url, cut)
    # as a writer that died mid-shard would have recorded it: the checksum matches the bytes
    _rewrite_manifest(root, lambda d: d["shards"][2].update(sha256=hashlib.sha256(cut).hexdigest()))
    readable = [s["__key__"] for s in iter_shard_samples(url)]
    lost = PER_SHARD - len(readable)
    assert 1 <= lost < PER_SHARD
    keys, counters = _epoch_counters(root, n_batches=35 - lost, max_corrupt_fraction=0.5)
    assert sorted(keys) == sorted({f"{i:09d}" for i in range(35)} - {f"{i:09d}" for i in range(21 - lost, 21)})
    assert counters["skipped_by_reason"] == {"missing_sample": lost} and counters["skipped"] == lost


def test_garbage_shard_is_skipped_and_counted(dataset, tmp_path):
    import hashlib

    root = _copy(dataset, tmp_path / "d")
    junk = np.random.default_rng(0).integers(0, 256, 20_000, dtype=np.uint8).tobytes()
    storage.write_bytes(storage.join(root, "shards/shard-000000.tar"), junk)  # keys 0..6
    _rewrite_manifest(root, lambda d: d["shards"][0].update(sha256=hashlib.sha256(junk).hexdigest()))
    keys, counters = _epoch_counters(root, n_batches=28, max_corrupt_fraction=0.5)
    assert sorted(keys) == [f"{i:09d}" for i in range(7, 35)]
    assert counters["skipped_by_reason"] == {"missing_sample": 7}
    with pytest.raises(CorruptDataError, match="missing_sample"):
        _epoch_counters(root, n_batches=28, max_corrupt_fraction=0.1)


def test_corrupt_tar_is_refused_by_its_checksum(dataset, tmp_path):
    root = _copy(dataset, tmp_path / "d")
    url = storage.join(root, "shards/shard-000001.tar")
    data = bytearray(storage.read_bytes(url))
    at = data.index(b"\x89PNG") + 60
    data[at : at + 40] = bytes(b ^ 0xFF for b in data[at : at + 40])  # damage an image, same length
    storage.write_bytes(url, bytes(data))
    with pytest.raises(ShardIntegrityError, match="shard-000001.tar"):
        _epoch_counters(root, n_batches=35, max_corrupt_fraction=1.0)


def test_non_image_member_and_missing_label(dataset, tmp_path):
    root = _copy(dataset, tmp_path / "d")

    def spoil(samples):
        samples[0]["png"] = b"definitely not an image"
        del samples[1]["cls"]
        samples[2] = {"__key__": samples[2]["__key__"], "txt": b"no image at all", "cls": b"1"}
        return samples

    _rewrite_shard(root, 4, spoil)
    keys, counters = _epoch_counters(root, n_batches=32, require_labels=True, max_corrupt_fraction=0.2)
    assert counters["skipped_by_reason"] == {"bad_image": 1, "missing_label": 1, "no_image": 1}
    assert sorted(keys) == [f"{i:09d}" for i in range(35) if i not in (28, 29, 30)]
    # without require_labels the unlabelled sample comes through with label -1
    reader = ShardReader(root, batch_size=33, max_corrupt_fraction=0.2, with_keys=True)
    _, y, k = next(iter(reader))
    assert int(y[k.index(f"{29:09d}")]) == -1 and reader.counters["skipped"] == 2


def test_too_many_corrupt_samples_fail_the_run(dataset, tmp_path):
    root = _copy(dataset, tmp_path / "d")
    _rewrite_shard(root, 0, lambda s: [dict(x, png=b"junk") for x in s])
    for workers in (0, 2):
        with pytest.raises(CorruptDataError, match="max_corrupt_fraction"):
            _epoch_counters(root, n_batches=35, max_corrupt_fraction=0.05, loader_workers=workers)


def test_manifest_problems_fail_fast(dataset, tmp_path):
    root = _copy(dataset, tmp_path / "d")
    _rewrite_manifest(root, lambda d: d.update(shards=[], num_samples=0))
    with pytest.raises(ValueError, match="lists no shards"):
        ShardReader(root, batch_size=1)
    with pytest.raises(FileNotFoundError, match="no dataset manifest"):
        ShardReader(str(tmp_path / "nothing"), batch_size=1)
    with pytest.raises(ValueError, match="4 shards|5 shards"):
        ShardReader(dataset, world_size=3, loader_workers=2, batch_size=1)
    npz = tmp_path / "u.npz"
    np.savez(npz, np.zeros((6, 8, 8, 3), np.uint8))
    prepare_dataset(str(npz), str(tmp_path / "u"), shard_size=3, workers=0, progress=False)
    with pytest.raises(ValueError, match="require_labels"):
        ShardReader(str(tmp_path / "u"), batch_size=1, require_labels=True)
    for bad in (dict(batch_size=0), dict(rank=2, world_size=2), dict(shuffle_buffer=0), dict(max_corrupt_fraction=2.0)):
        with pytest.raises(ValueError, match=next(iter(bad)) if "rank" not in bad else "rank"):
            ShardReader(dataset, **{"batch_size": 1, **bad})


def test_s3_failures_are_named(dataset, s3_bucket, monkeypatch):
    with pytest.raises(storage.BucketNotFound, match="missing-bucket-9"):
        ShardReader("s3://missing-bucket-9/ds", batch_size=1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(storage.EndpointUnreachable):
        ShardReader(s3_bucket + "/ds", batch_size=1, settings=storage.S3Settings(max_attempts=1), endpoint=f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-value")
    with pytest.raises(storage.AccessDenied) as err:
        ShardReader(s3_bucket + "/ds", batch_size=1)
    assert "wrong-secret-value" not in str(err.value)
