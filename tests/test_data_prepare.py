"""prepare_data: every source format -> shards (local and S3) -> decoded batches, pixel-exact;
Ray tasks vs in-process parity, idempotence, resuming an interrupted run, CLI errors."""

from __future__ import annotations

import io
import json
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data import storage
from pipeline.data.builtin import shapes10_batch, shapes10_image
from pipeline.data.prepare import ensure_ray, prepare_dataset
from pipeline.data.reader import ShardReader
from pipeline.data.shards import read_manifest, verify_dataset

ROOT = Path(__file__).resolve().parents[1]
N = 23  # 4 shards of 6 (the last one short)


def _images(n: int, h: int = 32, w: int = 32, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)


def _cifar_archive(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """Write the CIFAR-10 python archive format: 5 train batches + test batch + meta, pickled."""
    flat = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    parts = np.array_split(np.arange(len(images)), 5)
    with tarfile.open(path, "w:gz") as tar:

        def add(name: str, obj) -> None:
            data = pickle.dumps(obj, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        for i, idx in enumerate(parts, 1):
            add(f"data_batch_{i}", {b"data": flat[idx], b"labels": labels[idx].tolist(), b"batch_label": b"x"})
        add("test_batch", {b"data": flat[:2], b"labels": labels[:2].tolist()})
        add("batches.meta", {b"label_names": [f"c{i}".encode() for i in range(10)], b"num_cases_per_batch": 10})


def _make_source(kind: str, tmp: Path) -> tuple[str, np.ndarray, np.ndarray | None]:
    """A source of ``kind`` and the (images, labels) it must come back as, in index order."""
    if kind == "builtin":
        images, labels = shapes10_batch(0, N, seed=3)
        return "builtin:shapes10", images, labels
    images = _images(N)
    labels = np.arange(N) % 3
    if kind == "npz":
        np.savez(tmp / "ref.npz", images, labels)  # arr_0, arr_1: the openai reference format
        return str(tmp / "ref.npz"), images, labels
    if kind == "npz_unlabelled":
        np.savez(tmp / "ref.npz", arr_0=images)
        return str(tmp / "ref.npz"), images, None
    if kind == "cifar10":
        _cifar_archive(tmp / "cifar-10-python.tar.gz", images, labels)
        return str(tmp / "cifar-10-python.tar.gz"), images, labels
    if kind == "folder":
        # class subfolders; files sort by name within a class, classes by folder name
        order = []
        for i in range(N):
            cls = f"class_{labels[i]}"
            (tmp / "imgs" / cls).mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i]).save(tmp / "imgs" / cls / f"img_{i:03d}.png")
            order.append((cls, i))
        idx = [i for _, i in sorted(order)]
        return str(tmp / "imgs"), images[idx], labels[idx]
    if kind == "folder_flat":
        (tmp / "flat").mkdir()
        for i in range(N):
            Image.fromarray(images[i]).save(tmp / "flat" / f"{i:03d}.png")
        return str(tmp / "flat"), images, None
    raise AssertionError(kind)


def _decoded_by_index(url: str, n: int, **kw) -> tuple[dict[int, np.ndarray], dict[int, int]]:
    """One epoch of the reader (no flips), keyed by sample index, back in uint8."""
    reader = ShardReader(url, batch_size=1, hflip=False, shuffle_buffer=3, with_keys=True, **kw)
    images, labels = {}, {}
    for x, y, keys in reader:
        i = int(keys[0])
        images[i] = np.round((x[0].permute(1, 2, 0).numpy() + 1.0) * 127.5).astype(np.uint8)
        labels[i] = int(y[0])
        if len(images) == n:
            break
    return images, labels


@pytest.mark.parametrize("dest", ["local", "s3"])
@pytest.mark.parametrize("kind", ["builtin", "npz", "npz_unlabelled", "cifar10", "folder", "folder_flat"])
def test_each_source_round_trips_pixel_exact(kind, dest, tmp_path, request):
    spec, images, labels = _make_source(kind, tmp_path)
    out = str(tmp_path / "ds") if dest == "local" else request.getfixturevalue("s3_bucket") + "/ds"
    result = prepare_dataset(spec, out, shard_size=6, workers=0, num_samples=N if kind == "builtin" else None, seed=3, progress=False)
    m = result.manifest
    assert [s.samples for s in m.shards] == [6, 6, 6, 5] and m.num_samples == N and m.resolution == 32
    assert m.labelled == (labels is not None)
    assert verify_dataset(out) == []
    got, got_labels = _decoded_by_index(out, N)
    assert sorted(got) == list(range(N))
    for i in range(N):
        np.testing.assert_array_equal(got[i], images[i])
        assert got_labels[i] == (int(labels[i]) if labels is not None else -1)


def test_resolution_option_crops_and_resizes(tmp_path):
    images = _images(4, 40, 48)
    np.savez(tmp_path / "x.npz", images)
    m = prepare_dataset(str(tmp_path / "x.npz"), str(tmp_path / "ds"), resolution=16, workers=0, progress=False).manifest
    assert m.resolution == 16
    got, _ = _decoded_by_index(str(tmp_path / "ds"), 4)
    from pipeline.data.images import center_crop_resize

    for i in range(4):
        np.testing.assert_array_equal(got[i], center_crop_resize(images[i], 16))


def test_builtin_is_deterministic_and_balanced():
    a, la = shapes10_batch(0, 30, seed=7)
    b, lb = shapes10_batch(10, 30, seed=7)
    np.testing.assert_array_equal(a[10:], b)  # sample i depends on (seed, i) only
    assert not np.array_equal(shapes10_image(0, seed=7), shapes10_image(0, seed=8))
    assert np.bincount(la, minlength=10).tolist() == [3] * 10
    assert all(img.std() > 10 for img in a)  # a shape on a background, never a flat image


@pytest.fixture(scope="module")
def ray_session(s3_server):
    """One local Ray for this module, started with the S3 credentials in its environment."""
    import ray

    with pytest.MonkeyPatch.context() as mp:
        for name, value in s3_server.env().items():
            mp.setenv(name, value)
        started = ensure_ray(num_cpus=2)
        yield
        if started:
            ray.shutdown()


def test_ray_tasks_idempotence_and_resume(ray_session, s3_bucket, tmp_path):
    spec = "builtin:shapes10"
    out = s3_bucket + "/shapes"
    # reference: the same job in-process, locally; shards are byte-reproducible
    ref = prepare_dataset(spec, str(tmp_path / "ref"), shard_size=7, num_samples=35, workers=0, progress=False)
    first = prepare_dataset(spec, out, shard_size=7, num_samples=35, workers=2, progress=False)
    assert first.written == 5 and first.reused == 0
    assert [s.sha256 for s in first.manifest.shards] == [s.sha256 for s in ref.manifest.shards]
    manifest_bytes = storage.read_bytes(out + "/dataset.json")

    again = prepare_dataset(spec, out, shard_size=7, num_samples=35, workers=2, progress=False)
    assert again.written == 0 and storage.read_bytes(out + "/dataset.json") == manifest_bytes

    # an interrupted run: no manifest, one shard (and its commit record) missing
    storage.delete_prefix(out + "/dataset.json")
    storage.delete_prefix(out + "/shards/shard-000003.tar")
    storage.delete_prefix(out + "/shards/shard-000003.done.json")
    with pytest.raises(FileNotFoundError, match="no dataset manifest"):
        ShardReader(out, batch_size=1)
    resumed = prepare_dataset(spec, out, shard_size=7, num_samples=35, workers=2, progress=False)
    assert (resumed.written, resumed.reused) == (1, 4)
    assert storage.read_bytes(out + "/dataset.json") == manifest_bytes

    with pytest.raises(FileExistsError, match="different dataset"):
        prepare_dataset(spec, out, shard_size=5, num_samples=35, workers=0, progress=False)


def test_a_failing_shard_leaves_no_manifest_and_a_rerun_finishes(ray_session, tmp_path):
    spec, _, _ = _make_source("folder_flat", tmp_path)
    bad = Path(spec) / "007.png"
    good = bad.read_bytes()
    bad.write_bytes(b"this is not a png")
    out = str(tmp_path / "ds")
    with pytest.raises(ValueError, match="007.png"):
        prepare_dataset(spec, out, shard_size=6, workers=2, progress=False)
    assert not storage.exists(out + "/dataset.json")
    committed = [u for u in storage.list_prefix(out) if u.endswith(".done.json")]
    assert str(Path(out) / "shards/shard-000001.done.json") not in committed
    bad.write_bytes(good)
    result = prepare_dataset(spec, out, shard_size=6, workers=2, progress=False)
    assert result.written == 4 - len(committed) and result.reused == len(committed)
    assert verify_dataset(out) == []


def test_prepare_to_a_missing_bucket_fails_before_any_work(s3_env):
    with pytest.raises(storage.BucketNotFound, match="absent-bucket-77"):
        prepare_dataset("builtin:shapes10", "s3://absent-bucket-77/x", num_samples=5, workers=0, progress=False)


def test_cli_writes_a_dataset_and_rejects_bad_arguments(tmp_path, capsys):
    script = [sys.executable, str(ROOT / "launch" / "prepare_data.py")]
    args = ["--source", "builtin:shapes10", "--out", str(tmp_path / "d"), "--num-samples", "12", "--shard-size", "5"]
    ok = subprocess.run([*script, *args, "--workers", "0", "--verify"], capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert json.loads((tmp_path / "d" / "dataset.json").read_text())["num_samples"] == 12
    assert read_manifest(str(tmp_path / "d")).shards[-1].samples == 2

    from launch.prepare_data import main

    out = ["--out", str(tmp_path / "e"), "--workers", "0"]
    cases = [
        (["--source", "builtin:nope", *out], ["builtin:nope", "builtin:shapes10"]),
        (["--source", "builtin:shapes10", "--shard-size", "0", *out], ["shard_size", "0"]),
        (["--source", str(tmp_path / "missing.npz"), *out], ["missing.npz", "does not exist"]),
        (["--source", "builtin:shapes10", "--num-samples", "5", "--out", str(tmp_path / "d"), "--workers", "0"], ["different dataset"]),
    ]
    for argv, words in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert all(w in err for w in words), (argv, err)


def _random_clip(path: Path) -> str:
    """A shapes-micro CLIP with random weights: the embeddings need not be good to be stored exactly."""
    from safetensors.torch import save_file

    from pipeline.data.clip_embed import build_clip

    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in build_clip("shapes-micro")[0].state_dict().items()}, str(path))
    return str(path)


def test_ray_tasks_write_captions_and_clip_embeddings_the_reader_yields_by_key(ray_session, s3_bucket, tmp_path):
    from pipeline.data.builtin import builtin_caption, builtin_image
    from pipeline.data.clip_embed import load_embedder
    from pipeline.data.prepare import EmbedSpec
    from pipeline.data.reader import read_fields

    fields = ("clip_img", "clip_txt")
    out, weights = s3_bucket + "/unclip", _random_clip(tmp_path / "micro.safetensors")
    result = prepare_dataset("builtin:shapes10", out, shard_size=6, num_samples=24, workers=2, progress=False,
                             embed=EmbedSpec("shapes-micro", weights))
    m, emb = result.manifest, load_embedder("shapes-micro", weights)
    assert m.captions and m.embedder == {**emb.identity(), "fields": list(fields)}
    doc = json.loads(storage.read_bytes(out + "/dataset.json"))
    assert doc["captions"] is True and doc["embedder"]["dim"] == 32

    # Every sample's caption and embeddings, read back by key, are the builtin sample's own.
    got = read_fields(out)
    idx = [int(k) for k in got["keys"]]
    assert sorted(idx) == list(range(24))
    assert got["captions"] == [builtin_caption("shapes10", i) for i in idx]
    images = np.stack([builtin_image("shapes10", i) for i in idx])
    assert torch.allclose(got["clip_img"], emb.embed_images(images), atol=1e-6)
    assert torch.allclose(got["clip_txt"], emb.embed_texts(got["captions"]), atol=1e-6)

    # The training reader: extras row-aligned with keys; the same order and state as without fields.
    plain = ShardReader(out, batch_size=4, shuffle_buffer=5, with_keys=True)
    reader = ShardReader(out, batch_size=4, shuffle_buffer=5, with_keys=True, fields=fields)
    by_key = dict(zip(got["keys"], range(24)))
    it, it_plain = iter(reader), iter(plain)
    for _ in range(3):
        x, _, keys, extras = next(it)
        x_p, _, keys_p, *rest = next(it_plain)
        assert keys == keys_p and torch.equal(x, x_p) and rest == []
        rows = [by_key[k] for k in keys]
        assert set(extras) == set(fields) and extras["clip_img"].dtype == torch.float32
        for f in fields:
            assert torch.equal(extras[f], got[f][rows])
    state = reader.state_dict()
    assert state == plain.state_dict()
    x4, _, keys4, extras4 = next(it)
    resumed = ShardReader(out, batch_size=4, shuffle_buffer=5, with_keys=True, fields=fields)
    resumed.load_state_dict(state)
    x4r, _, keys4r, extras4r = next(iter(resumed))
    assert keys4r == keys4 and torch.equal(x4r, x4) and all(torch.equal(extras4r[f], extras4[f]) for f in fields)
