"""Where images come from before they become shards.

A source is a numbered sequence of samples that can be read in ranges, so shard ``i`` (samples
``i*S .. (i+1)*S-1``) can be produced by any worker independently:

- ``builtin:NAME`` (see :mod:`pipeline.data.builtin`): generated from (seed, index), any size;
- an image folder: one subfolder per class (labels = sorted subfolder names), or a flat folder
  of images (unlabelled);
- the CIFAR-10 python archive ``cifar-10-python.tar.gz`` (its standard pickled batches);
- an ``.npz`` with ``arr_0`` (N, H, W, C) uint8 and optional labels (``labels`` or ``arr_1``),
  the openai reference-batch format.

Captions (stored as each sample's ``txt``): generated for ``builtin:NAME``
(:func:`pipeline.data.builtin.builtin_caption`); a sidecar ``<image stem>.txt`` (utf-8) beside
each image of a folder; a ``captions`` array of N strings in an ``.npz``. A source has captions for
all of its samples or for none (``Source.captions``); a folder with some sidecars missing is refused.

:func:`open_source` picks the right one from the ``--source`` string and fails with a message
naming the argument and what is allowed.
"""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data import builtin, storage
from pipeline.data.images import center_crop_resize, decode_image

__all__ = [
    "ArraySource",
    "BuiltinSource",
    "ImageFolderSource",
    "Record",
    "Source",
    "load_cifar10_archive",
    "load_npz",
    "open_source",
]

_FOLDER_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm"}


@dataclasses.dataclass(frozen=True)
class Record:
    """One sample: (H, W, 3) uint8 image, label index or None, provenance for the json member,
    caption or None, named arrays or None."""

    index: int
    image: np.ndarray
    label: int | None
    origin: str
    caption: str | None = None
    arrays: dict[str, np.ndarray] | None = None  # per-sample vectors stored as <key>.<name>.npy (CLIP embeddings)


class Source:
    """Base class: ``num_samples``, ``classes`` (empty when unlabelled), ``captions`` (whether every
    record carries one), ``describe()``, ``read()``."""

    num_samples: int
    classes: tuple[str, ...]
    captions: bool = False

    def describe(self) -> dict[str, Any]:
        raise NotImplementedError

    def read(self, start: int, stop: int, resolution: int | None) -> list[Record]:
        raise NotImplementedError

    def _check_range(self, start: int, stop: int) -> None:
        if not 0 <= start <= stop <= self.num_samples:
            raise ValueError(f"range [{start}, {stop}) is outside the source's {self.num_samples} samples")


def _fit(image: np.ndarray, resolution: int | None) -> np.ndarray:
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    elif image.shape[2] == 4:
        image = image[..., :3]
    if resolution is not None and image.shape[:2] != (resolution, resolution):
        image = center_crop_resize(image, resolution)
    return np.ascontiguousarray(image)


class BuiltinSource(Source):
    def __init__(self, name: str, num_samples: int, seed: int = 0, resolution: int | None = None):
        if name not in builtin.BUILTIN_DATASETS:
            raise ValueError(
                f"source: 'builtin:{name}' is not allowed; builtin datasets are "
                + ", ".join(f"builtin:{n}" for n in sorted(builtin.BUILTIN_DATASETS))
            )
        if num_samples < 1:
            raise ValueError(f"num_samples: {num_samples!r} is not allowed; a builtin dataset needs >= 1")
        self.name, self.num_samples, self.seed = name, int(num_samples), int(seed)
        self.resolution = int(resolution or 32)
        self.classes = tuple(builtin.BUILTIN_DATASETS[name])
        self.captions = True

    def describe(self) -> dict[str, Any]:
        return {"kind": "builtin", "name": self.name, "num_samples": self.num_samples, "seed": self.seed}

    def read(self, start: int, stop: int, resolution: int | None) -> list[Record]:
        self._check_range(start, stop)
        res = resolution or self.resolution
        return [
            Record(i, builtin.builtin_image(self.name, i, self.seed, res), builtin.builtin_label(self.name, i, self.seed),
                   f"{self.name}/{i}", builtin.builtin_caption(self.name, i, self.seed))
            for i in range(start, stop)
        ]


class ArraySource(Source):
    """Images held in memory (CIFAR-10 archive, ``.npz``)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray | None, classes: Sequence[str], description: dict,
                 captions: Sequence[str] | None = None):
        if images.ndim != 4 or images.dtype != np.uint8 or images.shape[3] not in (1, 3, 4):
            raise ValueError(
                f"images: expected an (N, H, W, C) uint8 array with C in 1, 3, 4; got {images.dtype} {images.shape}"
            )
        if labels is not None and labels.shape != (images.shape[0],):
            raise ValueError(f"labels: expected shape ({images.shape[0]},), got {labels.shape}")
        if captions is not None and len(captions) != images.shape[0]:
            raise ValueError(f"captions: expected {images.shape[0]} captions (one per image), got {len(captions)}")
        self.images, self.labels = images, labels
        self.caption_list = None if captions is None else [str(c) for c in captions]
        self.captions = captions is not None
        self.num_samples = int(images.shape[0])
        self.classes = tuple(classes) if labels is not None else ()
        self.description = description

    def describe(self) -> dict[str, Any]:
        return dict(self.description, num_samples=self.num_samples)

    def read(self, start: int, stop: int, resolution: int | None) -> list[Record]:
        self._check_range(start, stop)
        return [
            Record(
                i,
                _fit(self.images[i], resolution),
                None if self.labels is None else int(self.labels[i]),
                f"{self.description.get('path', 'array')}#{i}",
                None if self.caption_list is None else self.caption_list[i],
            )
            for i in range(start, stop)
        ]


class ImageFolderSource(Source):
    """``root/<class>/<image>`` (labelled) or ``root/<image>`` (unlabelled); local or s3://."""

    def __init__(self, root: str, settings: storage.S3Settings | None = None):
        self.root, self.settings = str(root).rstrip("/"), settings
        prefix = self.root + "/"
        listing = storage.list_prefix(prefix, settings)
        files = [u for u in listing if Path(u).suffix.lower() in _FOLDER_IMAGE_SUFFIXES]
        rel = sorted(u[len(prefix) :] for u in files)
        rel = [r for r in rel if not any(part.startswith(".") for part in r.split("/"))]
        if not rel:
            raise ValueError(f"source: image folder {root!r} holds no images ({', '.join(sorted(_FOLDER_IMAGE_SUFFIXES))})")
        nested = [r for r in rel if "/" in r]
        flat = [r for r in rel if "/" not in r]
        if nested and flat:
            raise ValueError(
                f"source: image folder {root!r} mixes images at the top level ({flat[0]}) with class "
                f"subfolders ({nested[0].split('/')[0]}/); use one layout"
            )
        if nested:
            deep = [r for r in nested if r.count("/") > 1]
            if deep:
                raise ValueError(f"source: {root!r}/{deep[0]} is nested too deep; expected <class>/<image>")
            self.classes = tuple(sorted({r.split("/")[0] for r in nested}))
            index = {c: i for i, c in enumerate(self.classes)}
            self.files = [(r, index[r.split("/")[0]]) for r in nested]
        else:
            self.classes = ()
            self.files = [(r, None) for r in flat]
        self.num_samples = len(self.files)
        # Captions: a sidecar <stem>.txt beside every image, or none at all.
        texts = {u[len(prefix):] for u in listing if u.endswith(".txt")}
        have = [_sidecar(r) in texts for r, _ in self.files]
        if any(have) and not all(have):
            missing = next(r for (r, _), h in zip(self.files, have) if not h)
            raise ValueError(
                f"source: image folder {root!r} has caption files for {sum(have)} of {len(have)} images but none for "
                f"{missing} (expected {_sidecar(missing)}); give every image a caption file, or none"
            )
        self.captions = bool(have) and all(have)

    def describe(self) -> dict[str, Any]:
        return {"kind": "image_folder", "path": self.root, "num_samples": self.num_samples, "classes": list(self.classes),
                **({"captions": True} if self.captions else {})}

    def read(self, start: int, stop: int, resolution: int | None) -> list[Record]:
        self._check_range(start, stop)
        out = []
        for i in range(start, stop):
            rel, label = self.files[i]
            url = storage.join(self.root, rel)
            try:
                image = decode_image(storage.read_bytes(url, self.settings))
            except (OSError, ValueError, SyntaxError) as exc:
                if isinstance(exc, storage.StorageError):
                    raise
                raise ValueError(f"source: {url} is not a readable image ({type(exc).__name__}: {exc})") from None
            caption = None
            if self.captions:
                raw = storage.read_bytes(storage.join(self.root, _sidecar(rel)), self.settings)
                try:
                    caption = raw.decode("utf-8").strip()
                except UnicodeDecodeError:
                    raise ValueError(f"source: caption file {storage.join(self.root, _sidecar(rel))} is not utf-8") from None
            out.append(Record(i, _fit(image, resolution), label, rel, caption))
        return out


def _sidecar(rel: str) -> str:
    """The caption file of image ``rel``: same folder and stem, suffix ``.txt``."""
    stem, _, _ = rel.rpartition(".")
    return stem + ".txt"


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only plain containers and numpy arrays (the CIFAR batches), never code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a dataset archive")


def _unpickle(data: bytes) -> Any:
    return _ArrayUnpickler(io.BytesIO(data), encoding="bytes").load()


def load_cifar10_archive(path: str, split: str = "train") -> ArraySource:
    """``cifar-10-python.tar.gz`` -> images (N, 32, 32, 3) uint8 and labels, in the archive's order."""
    if split not in ("train", "test"):
        raise ValueError(f"split: {split!r} is not allowed; use 'train' or 'test'")
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    members: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r:*") as tar:
            for info in tar:
                base = info.name.rsplit("/", 1)[-1]
                if info.isfile() and base in set(names) | {"batches.meta"}:
                    members[base] = tar.extractfile(info).read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ValueError(f"source: {path!r} is not a readable CIFAR-10 python archive ({exc})") from None
    missing = [n for n in [*names, "batches.meta"] if n not in members]
    if missing:
        raise ValueError(f"source: {path!r} is not a CIFAR-10 python archive; missing member(s) {', '.join(missing)}")
    images, labels = [], []
    for n in names:
        batch = _unpickle(members[n])
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(np.asarray(batch[b"labels"], dtype=np.int64))
    meta = _unpickle(members["batches.meta"])
    classes = [c.decode() if isinstance(c, bytes) else str(c) for c in meta[b"label_names"]]
    desc = {"kind": "cifar10", "path": os.path.abspath(path), "split": split, "bytes": os.path.getsize(path)}
    return ArraySource(np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels), classes, desc)


def load_npz(path: str) -> ArraySource:
    """``arr_0`` (N, H, W, C) uint8 plus optional 1-D integer labels in ``labels`` or ``arr_1``."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            if "arr_0" not in npz.files:
                raise ValueError(f"source: {path!r} has no 'arr_0' (found {', '.join(npz.files) or 'nothing'})")
            images = npz["arr_0"]
            captions = None
            if "captions" in npz.files:
                captions = npz["captions"]
                if captions.ndim != 1 or len(captions) != len(images) or captions.dtype.kind not in "US":
                    raise ValueError(
                        f"source: {path!r} 'captions' must be a 1-D array of {len(images)} strings (one per image), "
                        f"got {captions.dtype} {captions.shape}"
                    )
                captions = [c.decode("utf-8") if isinstance(c, bytes) else str(c) for c in captions.tolist()]
            labels = None
            for name in ("labels", "arr_1"):
                if name in npz.files and npz[name].ndim == 1 and len(npz[name]) == len(images):
                    labels = npz[name]
                    break
    except (OSError, EOFError) as exc:
        raise ValueError(f"source: {path!r} is not a readable .npz ({exc})") from None
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"source: {path!r} arr_0 must be (N, H, W, C) uint8, got {images.dtype} {images.shape}")
    classes: list[str] = []
    if labels is not None:
        if not np.issubdtype(labels.dtype, np.integer) or (len(labels) and labels.min() < 0):
            raise ValueError(f"source: {path!r} labels must be non-negative integers, got {labels.dtype}")
        labels = labels.astype(np.int64)
        classes = [str(i) for i in range(int(labels.max()) + 1 if len(labels) else 0)]
    desc = {"kind": "npz", "path": os.path.abspath(path), "bytes": os.path.getsize(path)}
    if captions is not None:
        desc["captions"] = True
    return ArraySource(images, labels, classes, desc, captions)


def open_source(
    spec: str,
    *,
    num_samples: int | None = None,
    seed: int = 0,
    resolution: int | None = None,
    split: str = "train",
    settings: storage.S3Settings | None = None,
) -> Source:
    """The source named by ``spec`` (see the module docstring); ``num_samples`` caps its size."""
    if num_samples is not None and num_samples < 1:
        raise ValueError(f"num_samples: {num_samples!r} is not allowed; it must be >= 1")
    if spec.startswith("builtin:"):
        return BuiltinSource(spec[len("builtin:") :], num_samples or 10_000, seed=seed, resolution=resolution)
    allowed = "builtin:NAME, an image folder, cifar-10-python.tar.gz, or an .npz file"
    if storage.is_s3(spec):
        source: Source = ImageFolderSource(spec, settings)
    elif os.path.isdir(spec):
        source = ImageFolderSource(spec, settings)
    elif os.path.isfile(spec) and spec.endswith(".npz"):
        source = load_npz(spec)
    elif os.path.isfile(spec) and (spec.endswith(".tar.gz") or spec.endswith(".tgz") or spec.endswith(".tar")):
        source = load_cifar10_archive(spec, split)
    elif not os.path.exists(spec):
        raise ValueError(f"source: {spec!r} does not exist; expected {allowed}")
    else:
        raise ValueError(f"source: {spec!r} is not allowed; expected {allowed}")
    if num_samples is not None and num_samples < source.num_samples:
        source = _Head(source, num_samples)
    return source


class _Head(Source):
    """The first ``n`` samples of another source."""

    def __init__(self, inner: Source, n: int):
        self.inner, self.num_samples, self.classes = inner, int(n), inner.classes
        self.captions = inner.captions

    def describe(self) -> dict[str, Any]:
        return dict(self.inner.describe(), num_samples=self.num_samples)

    def read(self, start: int, stop: int, resolution: int | None) -> list[Record]:
        self._check_range(start, stop)
        return self.inner.read(start, stop, resolution)
