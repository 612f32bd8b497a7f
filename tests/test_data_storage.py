"""pipeline.data.storage against the local filesystem and a real S3 (SeaweedFS)."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import socket

import pytest

from pipeline.data import storage


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_bucket") + "/prefix"


def test_round_trip_of_every_operation(root, tmp_path):
    a = storage.join(root, "dir", "a.bin")
    b = storage.join(root, "dir", "sub", "b.bin")
    assert not storage.exists(a)
    storage.write_bytes(a, b"hello")
    storage.write_bytes(b, bytes(range(256)) * 10)
    storage.write_bytes(a, b"hello again")  # overwrite
    assert storage.read_bytes(a) == b"hello again"
    assert storage.exists(a) and storage.exists(storage.join(root, "dir"))
    assert storage.size(b) == 2560
    with storage.open_stream(b) as f:
        assert f.read(10) == bytes(range(10))
        assert f.read() == (bytes(range(256)) * 10)[10:]
    assert storage.list_prefix(storage.join(root, "dir")) == [a, b]
    assert storage.list_dir(storage.join(root, "dir")) == ["a.bin", "sub"]
    local = tmp_path / "down" / "b.bin"
    storage.download_file(b, local)
    assert local.read_bytes() == bytes(range(256)) * 10
    c = storage.join(root, "up", "c.bin")
    storage.upload_file(local, c)
    assert storage.read_bytes(c) == local.read_bytes()
    storage.write_bytes(storage.join(root, "dir2", "x"), b"sibling with a common prefix")
    assert storage.list_prefix(storage.join(root, "dir", "a.bin")) == [a]
    assert storage.delete_prefix(storage.join(root, "dir")) == 2
    assert storage.exists(storage.join(root, "dir2", "x"))
    assert not storage.exists(a) and storage.list_prefix(storage.join(root, "dir")) == []
    with pytest.raises(FileNotFoundError, match="a.bin"):
        storage.read_bytes(a)


def test_local_write_is_atomic_and_leaves_no_temp_files(tmp_path):
    target = tmp_path / "x" / "manifest.json"
    storage.write_bytes(str(target), b"1")
    storage.write_bytes(str(target), b"2")
    assert target.read_bytes() == b"2"
    assert sorted(p.name for p in target.parent.iterdir()) == ["manifest.json"]


def test_big_upload_is_multipart(s3_bucket, tmp_path):
    settings = storage.S3Settings(multipart_threshold=5 << 20, multipart_chunksize=5 << 20)
    payload = os.urandom(11 << 20)
    path = tmp_path / "big.bin"
    path.write_bytes(payload)
    url = f"{s3_bucket}/big.bin"
    storage.upload_file(path, url, settings)
    bucket, key = storage.split_s3(url)
    etag = storage.get_client(settings).head_object(Bucket=bucket, Key=key)["ETag"].strip('"')
    assert etag.endswith("-3"), etag  # S3's multipart ETag: md5 of part md5s + "-<parts>"
    assert hashlib.sha256(storage.read_bytes(url)).digest() == hashlib.sha256(payload).digest()


def test_wrong_secret_is_refused_and_not_echoed(s3_bucket, monkeypatch):
    url = f"{s3_bucket}/k"
    storage.write_bytes(url, b"data")
    wrong = "not-the-secret-" + "x" * 16
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong)
    with pytest.raises(storage.AccessDenied) as err:
        storage.read_bytes(url)
    assert wrong not in str(err.value) and os.environ["AWS_ACCESS_KEY_ID"] not in str(err.value)


def test_missing_bucket_is_named(s3_env):
    url = "s3://no-such-bucket-4f1c/data/x"
    for op in (storage.read_bytes, storage.exists, storage.list_prefix, storage.check_bucket):
        with pytest.raises(storage.BucketNotFound, match="no-such-bucket-4f1c"):
            op(url)


def test_unreachable_endpoint_fails_fast(s3_env):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens here
    settings = storage.S3Settings(endpoint_url=f"http://127.0.0.1:{port}", max_attempts=2, connect_timeout_s=2)
    with pytest.raises(storage.EndpointUnreachable, match=f"127.0.0.1:{port}"):
        storage.read_bytes("s3://bucket/key", settings)


def test_bad_urls_are_value_errors():
    for url in ("", "gs://bucket/x", "s3://"):
        with pytest.raises(ValueError, match="url"):
            storage.read_bytes(url)


def _child_reads(url: str, parent_client_id: int, conn) -> None:
    client = storage.get_client()
    conn.send((id(client) != parent_client_id, storage.read_bytes(url)))


def test_forked_child_gets_its_own_client(s3_bucket):
    url = f"{s3_bucket}/fork.bin"
    storage.write_bytes(url, b"x" * 1000)
    parent = storage.get_client()
    assert storage.get_client() is parent  # cached within a process
    ctx = multiprocessing.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child_reads, args=(url, id(parent), send))
    proc.start()
    assert recv.poll(60)
    fresh, data = recv.recv()
    proc.join(30)
    assert fresh and data == b"x" * 1000


def test_local_write_gives_the_usual_file_mode(tmp_path):
    """Atomic writes go through mkstemp (0600); the result must be readable like any other file."""
    target = tmp_path / "sub" / "metrics.json"
    storage.write_bytes(str(target), b"{}")
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask
