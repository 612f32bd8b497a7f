"""WebDataset shards and the ``dataset.json`` manifest.

Layout of a prepared dataset (local folder or ``s3://bucket/prefix``)::

    dataset.json                 manifest, written last: its presence means "complete"
    shards/shard-000000.tar      WebDataset tar: <key>.png (or .jpg/.webp), <key>.cls, <key>.json,
                                 <key>.txt (caption, utf-8), <key>.clip_img.npy / <key>.clip_txt.npy
                                 (float32 L2-normalised CLIP embeddings, when prepared with --embed)
    shards/shard-000000.done.json  commit record of one shard (samples, sha256, job fingerprint)

Shards are byte-for-byte reproducible (fixed tar metadata, deterministic encoders), so the same
job gives the same sha256 whoever writes it. Reading streams a shard through webdataset's tar
iterator while hashing the bytes, so integrity is checked without a second pass.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import posixpath
import queue
import re
import tempfile
import threading
from collections.abc import Iterator
from typing import IO, Any

from pipeline.data import storage
from pipeline.data.images import IMAGE_FORMATS, encode_image
from pipeline.data.sources import Record

__all__ = [
    "MANIFEST_NAME",
    "Manifest",
    "ShardInfo",
    "ShardIntegrityError",
    "iter_shard_samples",
    "manifest_url_for",
    "npy_array",
    "npy_bytes",
    "read_manifest",
    "shard_done_url",
    "shard_name",
    "verify_dataset",
    "write_manifest",
    "write_shard",
]

MANIFEST_NAME = "dataset.json"
MANIFEST_VERSION = 1
EMBEDDER_KEYS = ("name", "model", "weights_sha256", "dim")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class ShardIntegrityError(ValueError):
    """A shard's bytes do not match the sha256 its manifest records."""


@dataclasses.dataclass(frozen=True)
class ShardInfo:
    name: str  # relative to the manifest's folder
    samples: int
    sha256: str
    bytes: int
    resolution: int | None = None  # side of every image when all are that square size, else None


@dataclasses.dataclass(frozen=True)
class Manifest:
    url: str  # where this manifest was read from / is written to
    shards: tuple[ShardInfo, ...]
    num_samples: int
    resolution: int | None
    classes: tuple[str, ...]
    image_format: str
    source: dict[str, Any]
    fingerprint: str
    shard_size: int
    captions: bool = False  # every sample has a txt caption
    embedder: dict[str, Any] | None = None  # {name, model, weights_sha256, dim} when samples carry embeddings

    @property
    def root(self) -> str:
        return posixpath.dirname(self.url) if storage.is_s3(self.url) else os.path.dirname(self.url)

    @property
    def labelled(self) -> bool:
        return bool(self.classes)

    def shard_url(self, i: int) -> str:
        return storage.join(self.root, self.shards[i].name)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": "webdataset",
            "version": MANIFEST_VERSION,
            "num_samples": self.num_samples,
            "resolution": self.resolution,
            "classes": list(self.classes),
            "image_format": self.image_format,
            "shard_size": self.shard_size,
            "fingerprint": self.fingerprint,
            "source": self.source,
            **({"captions": True} if self.captions else {}),
            **({"embedder": dict(self.embedder)} if self.embedder else {}),
            "shards": [dataclasses.asdict(s) for s in self.shards],
        }


def manifest_url_for(url: str) -> str:
    """A dataset folder's manifest URL (a URL that already names a ``.json`` is returned as is)."""
    url = str(url)
    return url if url.endswith(".json") else storage.join(url, MANIFEST_NAME)


def shard_name(index: int) -> str:
    return f"shards/shard-{index:06d}.tar"


def shard_done_url(root: str, index: int) -> str:
    return storage.join(root, f"shards/shard-{index:06d}.done.json")


def _field(doc: dict, name: str, kind, url: str):
    if name not in doc:
        raise ValueError(f"manifest {url}: required field '{name}' is missing")
    value = doc[name]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ValueError(f"manifest {url}: field '{name}' = {value!r} is not a {getattr(kind, '__name__', kind)}")
    return value


def parse_manifest(doc: Any, url: str) -> Manifest:
    if not isinstance(doc, dict):
        raise ValueError(f"manifest {url}: expected a JSON object at the top level")
    if doc.get("format") != "webdataset" or doc.get("version") != MANIFEST_VERSION:
        raise ValueError(
            f"manifest {url}: format/version {doc.get('format')!r}/{doc.get('version')!r} is not supported; "
            f"expected 'webdataset'/{MANIFEST_VERSION}"
        )
    shards = []
    for i, entry in enumerate(_field(doc, "shards", list, url)):
        where = f"{url} shards[{i}]"
        if not isinstance(entry, dict):
            raise ValueError(f"manifest {where}: expected an object")
        name = _field(entry, "name", str, where)
        if name.startswith("/") or ".." in name.split("/") or "://" in name:
            raise ValueError(f"manifest {where}: name {name!r} must be a relative path inside the dataset")
        samples = _field(entry, "samples", int, where)
        sha = _field(entry, "sha256", str, where)
        if samples < 0:
            raise ValueError(f"manifest {where}: samples = {samples} must be >= 0")
        if not _SHA256.match(sha):
            raise ValueError(f"manifest {where}: sha256 {sha!r} is not 64 lowercase hex digits")
        res = entry.get("resolution")
        shards.append(ShardInfo(name, samples, sha, int(entry.get("bytes", 0)), res if isinstance(res, int) else None))
    resolution = doc.get("resolution")
    if resolution is not None and (not isinstance(resolution, int) or resolution < 1):
        raise ValueError(f"manifest {url}: resolution {resolution!r} must be a positive integer or null")
    classes = _field(doc, "classes", list, url)
    if not all(isinstance(c, str) for c in classes):
        raise ValueError(f"manifest {url}: classes must be a list of strings")
    embedder = doc.get("embedder")
    if embedder is not None:
        if not isinstance(embedder, dict) or not all(k in embedder for k in EMBEDDER_KEYS):
            raise ValueError(f"manifest {url}: embedder {embedder!r} must be an object with {', '.join(EMBEDDER_KEYS)}")
        if not isinstance(embedder["dim"], int) or embedder["dim"] < 1:
            raise ValueError(f"manifest {url}: embedder dim {embedder['dim']!r} must be a positive integer")
    num_samples = _field(doc, "num_samples", int, url)
    if num_samples != sum(s.samples for s in shards):
        raise ValueError(
            f"manifest {url}: num_samples {num_samples} differs from the sum over shards {sum(s.samples for s in shards)}"
        )
    return Manifest(
        url=url,
        shards=tuple(shards),
        num_samples=num_samples,
        resolution=resolution,
        classes=tuple(classes),
        image_format=str(doc.get("image_format", "png")),
        source=dict(doc.get("source") or {}),
        fingerprint=str(doc.get("fingerprint", "")),
        shard_size=int(doc.get("shard_size", 0)),
        captions=bool(doc.get("captions", False)),
        embedder=dict(embedder) if embedder is not None else None,
    )


def read_manifest(url: str, settings: storage.S3Settings | None = None) -> Manifest:
    """Read and validate the manifest of the dataset at ``url`` (a folder or its ``dataset.json``)."""
    murl = manifest_url_for(url)
    try:
        raw = storage.read_bytes(murl, settings)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{murl}: no dataset manifest here; run launch/prepare_data.py to create one "
            "(an interrupted preparation leaves no manifest)"
        ) from None
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"manifest {murl}: not valid JSON ({exc})") from None
    return parse_manifest(doc, murl)


def write_manifest(manifest: Manifest, settings: storage.S3Settings | None = None) -> None:
    storage.write_bytes(manifest.url, (json.dumps(manifest.to_json(), indent=1) + "\n").encode(), settings)


# ---------------------------------------------------------------------------------------------
# Writing


def write_shard(
    records: list[Record],
    root: str,
    index: int,
    image_format: str = "png",
    quality: int = 95,
    classes: tuple[str, ...] = (),
    fingerprint: str = "",
    settings: storage.S3Settings | None = None,
) -> ShardInfo:
    """Write ``records`` as shard ``index`` under ``root``, then its commit record; return its info."""
    import webdataset as wds

    ext = IMAGE_FORMATS[image_format]
    fd, tmp = tempfile.mkstemp(prefix="shard-", suffix=".tar")
    try:
        with os.fdopen(fd, "wb") as f:
            # Fixed owner/mode/mtime: the tar bytes depend only on the samples. An integer mtime
            # keeps plain ustar headers (a float one adds a PAX header to every member).
            with wds.TarWriter(f, user="data", group="data", mode=0o444, encoder=False, mtime=0) as sink:
                for rec in records:
                    meta = {"index": rec.index, "origin": rec.origin}
                    sample = {"__key__": f"{rec.index:09d}", ext: encode_image(rec.image, image_format, quality)}
                    if rec.label is not None:
                        sample["cls"] = str(rec.label).encode()
                        meta["label"] = classes[rec.label] if rec.label < len(classes) else rec.label
                    if rec.caption is not None:
                        sample["txt"] = rec.caption.encode("utf-8")
                    for name, array in sorted((rec.arrays or {}).items()):
                        sample[f"{name}.npy"] = npy_bytes(array)
                    sample["json"] = json.dumps(meta, sort_keys=True).encode()
                    sink.write(sample)
        h = hashlib.sha256()
        with open(tmp, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        sizes = {rec.image.shape[:2] for rec in records}
        (height, width), = sizes if len(sizes) == 1 else ((0, 1),)
        side = height if height == width else None
        info = ShardInfo(shard_name(index), len(records), h.hexdigest(), os.path.getsize(tmp), side)
        storage.upload_file(tmp, storage.join(root, info.name), settings)
    finally:
        os.unlink(tmp)
    done = dict(dataclasses.asdict(info), fingerprint=fingerprint)
    storage.write_bytes(shard_done_url(root, index), json.dumps(done).encode(), settings)
    return info


def npy_bytes(array: Any) -> bytes:
    """``array`` as the bytes of a ``.npy`` file (deterministic: fixed header, C order)."""
    import numpy as np

    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def npy_array(data: bytes) -> Any:
    """The array of ``.npy`` bytes (never unpickles)."""
    import numpy as np

    return np.load(io.BytesIO(data), allow_pickle=False)


# ---------------------------------------------------------------------------------------------
# Reading


class _HashingStream:
    """Pass-through reader that hashes every byte it hands out and counts them."""

    def __init__(self, raw: IO[bytes]):
        self.raw, self.sha, self.nbytes = raw, hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.sha.update(data)
        self.nbytes += len(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass

    def close(self) -> None:
        self.raw.close()


class _ReadAhead:
    """Reads a stream in a background thread, so network transfer overlaps decoding."""

    def __init__(self, raw: IO[bytes], chunk: int = 1 << 20, depth: int = 8, timeout_s: float = 600.0):
        self.raw, self.chunk, self.timeout_s = raw, chunk, timeout_s
        self._queue: queue.Queue = queue.Queue(depth)
        self._buf = bytearray()
        self._eof = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="shard-readahead", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                data = self.raw.read(self.chunk)
                self._put(data)
                if not data:
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the reading thread
            self._put(exc)

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def read(self, n: int = -1) -> bytes:
        while not self._eof and (n < 0 or len(self._buf) < n):
            try:
                item = self._queue.get(timeout=self.timeout_s)
            except queue.Empty:
                raise storage.StorageError(f"{self.raw!r}: no data for {self.timeout_s:.0f} s") from None
            if isinstance(item, BaseException):
                self._eof = True
                raise item
            if not item:
                self._eof = True
            self._buf += item
        if n < 0:
            n = len(self._buf)
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.raw.close()


@dataclasses.dataclass
class ShardRead:
    """The outcome of streaming one shard: error text if it was cut short, the bytes' sha256."""

    error: str | None = None
    sha256: str | None = None
    extra_samples: int = 0


def iter_shard_samples(
    url: str,
    settings: storage.S3Settings | None = None,
    result: ShardRead | None = None,
    readahead: bool = True,
) -> Iterator[dict[str, Any]]:
    """Stream the samples of one shard as webdataset sample dicts (``__key__``, ``png``, ``cls``...).

    A tar that is truncated or corrupt ends the iteration early (no exception); ``result.error``
    says why. Once the generator is exhausted, ``result.sha256`` holds the hash of the shard's
    bytes (read to the end of the object).
    """
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    result = result if result is not None else ShardRead()
    raw = storage.open_stream(url, settings)
    if readahead and storage.is_s3(url):
        s = settings or storage.DEFAULT_SETTINGS
        raw = _ReadAhead(raw, timeout_s=s.read_timeout_s * s.max_attempts + 30)
    stream = _HashingStream(raw)
    try:
        files = ({**f, "__url__": url} for f in tar_file_iterator(stream))
        try:
            yield from group_by_keys(files)
        except storage.StorageError:
            raise
        except Exception as exc:  # noqa: BLE001 - a damaged tar: report, do not crash the reader
            result.error = f"{type(exc).__name__}: {str(exc).split(' @ ')[0]}"
        stream.drain()
        result.sha256 = stream.sha.hexdigest()
    finally:
        stream.close()


def verify_dataset(url: str, settings: storage.S3Settings | None = None) -> list[str]:
    """Stream every shard of the dataset and return the problems found (empty when all is well)."""
    manifest = read_manifest(url, settings)
    problems = []
    for i, info in enumerate(manifest.shards):
        result = ShardRead()
        shard_url = manifest.shard_url(i)
        try:
            count = sum(1 for _ in iter_shard_samples(shard_url, settings, result))
        except FileNotFoundError:
            problems.append(f"{shard_url}: missing")
            continue
        if result.error:
            problems.append(f"{shard_url}: damaged tar ({result.error})")
        if result.sha256 != info.sha256:
            problems.append(f"{shard_url}: sha256 {result.sha256} does not match the manifest's {info.sha256}")
        if count != info.samples:
            problems.append(f"{shard_url}: {count} samples, the manifest says {info.samples}")
    return problems
