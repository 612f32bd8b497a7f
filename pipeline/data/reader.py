"""Streaming, exactly resumable reader of WebDataset shards: ``ShardReader``.

Order of samples (all of it a pure function of the manifest and the reader's settings):

1. epoch ``e``: the shards are permuted with an RNG seeded by ``(seed, e)``; rank ``r`` of ``R``
   takes every R-th shard of the permutation from position ``r``, and loader worker ``w`` of
   ``W`` takes every W-th of those (:func:`worker_shards`). Shares are disjoint and cover the
   epoch.
2. each worker streams its shards in that order and shuffles samples within a buffer of
   ``shuffle_buffer`` (:func:`buffer_shuffle_order`): the buffer fills, then every further read
   emits a uniformly chosen buffered sample; the buffer drains at the end of the worker's epoch.
   Because shards carry their sample counts in the manifest, the emission order is computed from
   the counts alone, before any byte is read.
3. horizontal flips are drawn per emission position from the same per-(epoch, rank, worker) RNG.

Position is therefore just ``(epoch, emission index)`` per worker; batches carry their worker's
position, the reader keeps the last one it handed out, and a resumed reader re-reads only the
shards still holding samples of the shuffle buffer. With DataLoader workers, batches come round-
robin from the workers; the resumed loader is rotated so the same worker comes next.

Another world size (elastic resume, :meth:`ShardReader.load_resplit`): the samples the old
readers consumed in the epochs in progress are known from their positions, so the rest of each
such epoch (a "carry": sorted ranges of global sample ids, shard-major in manifest order) is cut
into ``world_size x loader_workers`` contiguous chunks, one per new reader, each streamed with its
own shuffle buffer; later epochs follow the plan above at the new world size. Within the epochs in
progress no sample is lost and none is read twice.

Per-sample vectors (``fields``, e.g. ``("clip_img", "clip_txt")``: the ``<key>.<field>.npy``
members that ``prepare_data --embed clip`` writes) come with each batch as one extra last element,
``{field: float32 (B, d)}``, row-aligned with the images. A sample without one of them is an
error that names the field and the shard (not a skipped sample: the dataset was prepared without
it). Fields change nothing in the order of samples, so the reader's state is the same with them.
A horizontal flip flips the image, not its stored vectors (the builtin captions never say left or
right; set ``hflip=False`` to condition on the exact embedding of the image the model sees).

Bad samples (undecodable image, no image member, missing/invalid ``cls`` when labels are
required, samples lost to a truncated tar) are skipped, logged and counted; past
``max_corrupt_fraction`` of the samples seen (at least one epoch's worth of samples is the
denominator) the reader raises :class:`CorruptDataError`. A shard whose bytes do not hash to the
manifest's sha256 raises :class:`~pipeline.data.shards.ShardIntegrityError`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.data import storage
from pipeline.data.images import IMAGE_EXTENSIONS, center_crop_resize, decode_image
from pipeline.data.shards import (
    Manifest,
    ShardIntegrityError,
    ShardRead,
    iter_shard_samples,
    npy_array,
    read_manifest,
)

__all__ = [
    "CorruptDataError",
    "EpochPlan",
    "ShardReader",
    "buffer_shuffle_order",
    "epoch_plan",
    "epoch_shard_permutation",
    "MissingFieldError",
    "iter_dataset",
    "resplit_carry",
    "read_fields",
    "worker_shards",
]

log = logging.getLogger(__name__)

STATE_VERSION = 1
_SKIP_REASONS = ("missing_sample", "no_image", "bad_image", "missing_label", "bad_label")
_SALT_SHARDS = 0x5348  # "SH": RNG stream of the shard permutation
_SALT_SAMPLES = 0x534D  # "SM": RNG stream of the buffer shuffle and flips
_SALT_CARRY = 0x4352  # "CR": RNG stream of a re-split epoch's buffer shuffle and flips


class CorruptDataError(RuntimeError):
    """More samples were skipped as corrupt than ``max_corrupt_fraction`` allows."""


class MissingFieldError(ValueError):
    """A sample lacks a per-sample array the reader was asked for (``fields``), or it has the wrong shape."""


def check_fields(manifest: Manifest, fields: tuple[str, ...]) -> int | None:
    """The vector size of ``fields`` from the manifest's embedder (None without fields); raises
    :class:`MissingFieldError` when the dataset was prepared without them."""
    if not fields:
        return None
    bad = [f for f in fields if not f or not f.replace("_", "").isalnum() or not f.islower()]
    if bad or len(set(fields)) != len(fields):
        raise MissingFieldError(f"data.fields: {list(fields)!r} is not allowed; give distinct lowercase names such as "
                                "['clip_img', 'clip_txt']")
    emb = manifest.embedder
    if not emb:
        raise MissingFieldError(
            f"data.fields: {list(fields)!r} is not allowed: dataset {manifest.url} has no per-sample embeddings (its "
            "dataset.json records no embedder); prepare it with launch/prepare_data.py --embed clip --clip-model NAME "
            "--clip-weights FILE, or set data.fields=[]")
    stored = emb.get("fields", ["clip_img", "clip_txt"])
    missing = [f for f in fields if f not in stored]
    if missing:
        raise MissingFieldError(f"data.fields: {missing[0]!r} is not allowed: dataset {manifest.url} stores "
                                f"{', '.join(stored)} per sample")
    return int(emb["dim"])


def decode_fields(sample: dict[str, Any], fields: tuple[str, ...], dim: int | None) -> dict[str, np.ndarray]:
    """The float32 (d,) vectors ``fields`` of one raw sample; :class:`MissingFieldError` when one is absent."""
    out = {}
    for f in fields:
        data = sample.get(f"{f}.npy")
        where = f"shard {sample.get('__url__')} sample {sample.get('__key__')}"
        if data is None:
            raise MissingFieldError(f"data.fields: {f!r} is missing in {where} (no member {sample.get('__key__')}.{f}.npy); "
                                    "re-prepare the dataset with --embed clip")
        try:
            vec = npy_array(data)
        except ValueError as exc:
            raise MissingFieldError(f"data.fields: {f!r} in {where} is not a readable .npy ({exc})") from None
        if vec.ndim != 1 or (dim is not None and vec.shape[0] != dim):
            raise MissingFieldError(f"data.fields: {f!r} in {where} has shape {vec.shape}; the manifest's embedder "
                                    f"says ({dim},)")
        out[f] = vec.astype(np.float32, copy=False)
    return out


def epoch_shard_permutation(num_shards: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed & 0xFFFFFFFF, epoch, _SALT_SHARDS]).permutation(num_shards)


def worker_shards(num_shards: int, seed: int, epoch: int, rank: int, world_size: int, worker: int, num_workers: int) -> list[int]:
    """Shard indices that ``(rank, worker)`` reads in ``epoch``, in reading order."""
    perm = epoch_shard_permutation(num_shards, seed, epoch)
    return [int(s) for s in perm[rank::world_size][worker::num_workers]]


def buffer_shuffle_order(n: int, buffer_size: int, uniforms: np.ndarray) -> np.ndarray:
    """Emission order (read indices) of a shuffle buffer of ``buffer_size`` over ``n`` reads.

    ``uniforms`` holds ``n`` draws from U[0, 1); draw ``k`` picks the ``k``-th emitted sample.
    """
    order = np.empty(n, dtype=np.int64)
    buf: list[int] = []
    k = 0
    for r in range(n):
        buf.append(r)
        if len(buf) >= buffer_size:
            j = int(uniforms[k] * len(buf))
            buf[j], buf[-1] = buf[-1], buf[j]
            order[k] = buf.pop()
            k += 1
    while buf:
        j = int(uniforms[k] * len(buf))
        buf[j], buf[-1] = buf[-1], buf[j]
        order[k] = buf.pop()
        k += 1
    return order


@dataclass(frozen=True)
class EpochPlan:
    """What one reader (rank, loader worker) reads in one epoch: ``shards`` in reading order, of
    each the sample indices it takes (``members``, ascending), the emission ``order`` (read indices)
    and one flip per emission."""

    shards: list[int]
    members: list[np.ndarray]
    order: np.ndarray
    flips: np.ndarray

    def read_ids(self, shard_starts: np.ndarray) -> np.ndarray:
        """Global sample id (``shard_starts[shard] + index``) of every read, in reading order."""
        if not self.shards:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([shard_starts[s] + m for s, m in zip(self.shards, self.members)]).astype(np.int64)


def _shard_starts(counts: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


def _expand(ranges: list[list[int]]) -> np.ndarray:
    if not ranges:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in ranges])


def _ranges(ids: np.ndarray) -> list[list[int]]:
    """Sorted unique ids as [start, stop) ranges."""
    if ids.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(ids) != 1) + 1
    starts, stops = ids[np.r_[0, breaks]], ids[np.r_[breaks - 1, ids.size - 1]] + 1
    return [[int(a), int(b)] for a, b in zip(starts, stops)]


def epoch_plan(counts: np.ndarray, seed: int, epoch: int, rank: int, world_size: int, worker: int,
               num_workers: int, shuffle_buffer: int, carry: dict[str, Any] | None = None) -> EpochPlan:
    """The plan of reader ``(rank, worker)`` in ``epoch`` over shards of ``counts`` samples.

    Without a carry (or past its last epoch): this reader's shards of the epoch's permutation, whole.
    In an epoch up to ``carry["last"]``: its contiguous chunk of the epoch's remaining samples.
    """
    if carry is not None and epoch <= int(carry["last"]):
        ids = _expand(carry["epochs"].get(str(epoch), []))
        readers, j = world_size * num_workers, rank * num_workers + worker
        chunk = ids[j * ids.size // readers:(j + 1) * ids.size // readers]
        starts = _shard_starts(counts)
        owner = np.searchsorted(starts, chunk, side="right") - 1
        shards = [int(s) for s in np.unique(owner)]  # ascending: the chunk is sorted
        members = [chunk[owner == s] - starts[s] for s in shards]
        salt = _SALT_CARRY
    else:
        shards = worker_shards(len(counts), seed, epoch, rank, world_size, worker, num_workers)
        members = [np.arange(int(counts[s]), dtype=np.int64) for s in shards]
        salt = _SALT_SAMPLES
    n = int(sum(m.size for m in members))
    rng = np.random.default_rng([seed & 0xFFFFFFFF, epoch, rank, worker, salt])
    order = buffer_shuffle_order(n, shuffle_buffer, rng.random(n))
    flips = rng.random(n) < 0.5
    return EpochPlan(shards, members, order, flips)


def resplit_carry(counts: np.ndarray, seed: int, shuffle_buffer: int, old_world: int, old_workers: int,
                  positions: list[list[tuple[int, int]]], carry: dict[str, Any] | None) -> tuple[dict[str, Any], int]:
    """What is left of the epochs in progress after readers of ``old_world`` ranks x ``old_workers``
    stopped at ``positions[rank][worker] = (epoch, emission index)`` (under their own ``carry``).

    Returns ``(new carry, epoch to start at)``: the new carry holds, per epoch from the oldest in
    progress to the newest, the ranges of global sample ids that no old reader consumed.
    """
    starts = _shard_starts(counts)
    epochs = [e for row in positions for e, _ in row]
    first, last = min(epochs), max(epochs)
    left: dict[str, list[list[int]]] = {}
    for epoch in range(first, last + 1):
        if carry is not None and epoch <= int(carry["last"]):
            pool = _expand(carry["epochs"].get(str(epoch), []))
        else:
            pool = np.arange(int(starts[-1]), dtype=np.int64)
        taken = []
        for rank, row in enumerate(positions):
            for worker, (e, position) in enumerate(row):
                if e < epoch:
                    continue  # has not started this epoch
                plan = epoch_plan(counts, seed, epoch, rank, old_world, worker, old_workers, shuffle_buffer, carry)
                ids = plan.read_ids(starts)
                taken.append(ids if e > epoch else ids[plan.order[:position]])
        used = np.concatenate(taken) if taken else np.zeros(0, dtype=np.int64)
        rest = np.setdiff1d(pool, used)
        if rest.size:
            left[str(epoch)] = _ranges(rest)
    start = min((int(e) for e in left), default=last + 1)
    return {"last": last, "epochs": left}, start


class _Missing:
    def __init__(self, reason: str):
        self.reason = reason


class _WorkerStream(torch.utils.data.IterableDataset):
    """The per-worker half of :class:`ShardReader` (runs in DataLoader workers or in-process)."""

    def __init__(self, reader: ShardReader, states: list[dict[str, Any]], offset: int):
        super().__init__()
        self.manifest = reader.manifest
        self.settings = reader.settings
        self.opts = dict(
            rank=reader.rank,
            world_size=reader.world_size,
            num_workers=reader.num_workers,
            batch_size=reader.batch_size,
            resolution=reader.resolution,
            hflip=reader.hflip,
            seed=reader.seed,
            shuffle_buffer=reader.shuffle_buffer,
            require_labels=reader.require_labels,
            max_corrupt_fraction=reader.max_corrupt_fraction,
            verify_sha256=reader.verify_sha256,
            fields=reader.fields,
            field_dim=reader.field_dim,
        )
        self.carry = reader.carry
        self.states = [dict(s, skipped_by_reason=dict(s["skipped_by_reason"])) for s in states]
        self.offset = offset

    # -- order --------------------------------------------------------------------------------
    def _epoch_plan(self, epoch: int, worker: int) -> EpochPlan:
        o = self.opts
        counts = np.array([sh.samples for sh in self.manifest.shards], dtype=np.int64)
        return epoch_plan(counts, o["seed"], epoch, o["rank"], o["world_size"], worker, o["num_workers"],
                          o["shuffle_buffer"], self.carry)

    # -- bytes --------------------------------------------------------------------------------
    def _reads(self, plan: EpochPlan, first_shard: int) -> Iterator[tuple[int, Any]]:
        """(read index, sample dict or _Missing) for every sample of the plan from shard ``first_shard`` on."""
        shards, members = plan.shards, plan.members
        starts = _shard_starts(np.array([m.size for m in members], dtype=np.int64))
        for j in range(first_shard, len(shards)):
            info = self.manifest.shards[shards[j]]
            url = self.manifest.shard_url(shards[j])
            wanted = members[j]
            result = ShardRead()
            got = ptr = 0
            for sample in iter_shard_samples(url, self.settings, result):
                if got < info.samples:
                    if ptr < wanted.size and wanted[ptr] == got:
                        sample["__url__"] = url
                        yield int(starts[j] + ptr), sample
                        ptr += 1
                else:
                    result.extra_samples += 1
                got += 1
            if result.extra_samples:
                log.warning("%s: %d samples beyond the manifest's %d are ignored", url, result.extra_samples, info.samples)
            if got < info.samples:
                reason = f"{url}: only {got} of {info.samples} samples readable" + (f" ({result.error})" if result.error else "")
                log.warning("%s", reason)
                for i in range(ptr, wanted.size):
                    yield int(starts[j] + i), _Missing(reason)
            if self.opts["verify_sha256"] and result.sha256 != info.sha256:
                raise ShardIntegrityError(
                    f"{url}: sha256 of the shard's bytes is {result.sha256}, but the manifest "
                    f"{self.manifest.url} records {info.sha256}; the shard changed after preparation "
                    "(re-run prepare_data, or restore the shard)"
                )

    def _samples(self, epoch: int, position: int, worker: int) -> Iterator[tuple[int, Any, bool, int]]:
        """(emission index, raw sample, flip, samples in epoch) from ``position`` to the epoch's end."""
        plan = self._epoch_plan(epoch, worker)
        order, flips = plan.order, plan.flips
        n = len(order)
        if position >= n:
            return
        needed = np.zeros(n, dtype=bool)
        needed[order[position:]] = True
        starts = np.cumsum([m.size for m in plan.members])
        first_shard = int(np.searchsorted(starts, int(order[position:].min()), side="right"))
        reads = self._reads(plan, first_shard)
        pending: dict[int, Any] = {}
        try:
            for k in range(position, n):
                want = int(order[k])
                while want not in pending:
                    r, sample = next(reads)
                    if needed[r]:
                        pending[r] = sample
                yield k, pending.pop(want), bool(flips[k]), n
            for _ in reads:  # finish the last shard: read to its end and check its sha256
                pass
        finally:
            reads.close()

    # -- decoding -----------------------------------------------------------------------------
    def _decode(self, sample: Any) -> tuple[np.ndarray | None, int, str | None]:
        """(image, label, skip reason) of one raw sample."""
        if isinstance(sample, _Missing):
            return None, -1, "missing_sample"
        data = next((sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample), None)
        if data is None:
            return None, -1, "no_image"
        label = -1
        if "cls" in sample:
            try:
                label = int(sample["cls"].decode().strip())
            except (ValueError, UnicodeDecodeError):
                return None, -1, "bad_label"
            if self.manifest.classes and not 0 <= label < len(self.manifest.classes):
                return None, -1, "bad_label"
        elif self.opts["require_labels"]:
            return None, -1, "missing_label"
        try:
            image = decode_image(data)
        except Exception:  # noqa: BLE001 - PIL raises many types for bad bytes
            return None, -1, "bad_image"
        return image, label, None

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        physical = info.id if info is not None else 0
        worker = (physical + self.offset) % self.opts["num_workers"]
        state = self.states[worker]
        if info is not None:
            torch.set_num_threads(1)  # one decode thread per loader worker
        yield from self._batches(worker, state)

    def _batches(self, worker: int, state: dict[str, Any]):
        o = self.opts
        bs, res = o["batch_size"], o["resolution"]
        images = np.empty((bs, res, res, 3), dtype=np.uint8)
        labels = np.empty(bs, dtype=np.int64)
        fields, dim = o["fields"], o["field_dim"]
        extras = {f: np.empty((bs, dim), dtype=np.float32) for f in fields}
        keys: list[str] = []
        while True:
            epoch, position = state["epoch"], state["position"]
            produced_this_epoch = 0
            n = None
            for k, sample, flip, n in self._samples(epoch, position, worker):
                image, label, reason = self._decode(sample)
                state["position"] = k + 1
                if reason is not None:
                    self._skip(state, reason, sample, n)
                    continue
                vectors = decode_fields(sample, fields, dim) if fields else {}
                image = center_crop_resize(image, res)
                if o["hflip"] and flip:
                    image = image[:, ::-1]
                images[len(keys)] = image
                labels[len(keys)] = label
                for f, vec in vectors.items():
                    extras[f][len(keys)] = vec
                keys.append(sample["__key__"])
                state["yielded"] += 1
                produced_this_epoch += 1
                if len(keys) == bs:
                    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0).contiguous()
                    out_state = dict(state, skipped_by_reason=dict(state["skipped_by_reason"]))
                    vecs = {f: torch.from_numpy(a.copy()) for f, a in extras.items()}
                    yield x, torch.from_numpy(labels.copy()), list(keys), worker, out_state, vecs
                    keys = []
            if n is not None and position == 0 and produced_this_epoch == 0:
                raise CorruptDataError(
                    f"rank {o['rank']} loader worker {worker}: every one of its {n} samples in epoch {epoch} "
                    "was skipped as corrupt; nothing to train on"
                )
            state["epoch"], state["position"] = epoch + 1, 0

    def _skip(self, state: dict[str, Any], reason: str, sample: Any, epoch_size: int) -> None:
        o = self.opts
        state["skipped"] += 1
        state["skipped_by_reason"][reason] = state["skipped_by_reason"].get(reason, 0) + 1
        where = sample.reason if isinstance(sample, _Missing) else f"{sample.get('__url__')} key {sample.get('__key__')}"
        log.warning("skipping a corrupt sample (%s): %s", reason, where)
        seen = state["yielded"] + state["skipped"]
        budget = o["max_corrupt_fraction"] * max(seen, epoch_size)
        if state["skipped"] > budget:
            raise CorruptDataError(
                f"rank {o['rank']}: skipped {state['skipped']} corrupt samples of {seen} seen "
                f"({dict(state['skipped_by_reason'])}), more than data.max_corrupt_fraction="
                f"{o['max_corrupt_fraction']} allows; last: {reason} at {where}"
            )


class ShardReader:
    """Batches ``(images, labels)`` streamed from a prepared dataset, forever, resumably.

    ``images``: float32 (B, 3, R, R) in [-1, 1]; ``labels``: int64 (B,), -1 where the sample has
    no label. With ``with_keys`` each batch also carries the list of sample keys. With ``fields``
    each batch ends with ``{field: float32 (B, d)}`` (see the module docstring): ``(images, labels,
    extras)`` or ``(images, labels, keys, extras)``.
    """

    def __init__(
        self,
        url: str,
        *,
        rank: int = 0,
        world_size: int = 1,
        batch_size: int = 64,
        resolution: int | None = None,
        hflip: bool = True,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        loader_workers: int = 0,
        require_labels: bool = False,
        max_corrupt_fraction: float = 0.01,
        endpoint: str | None = None,
        verify_sha256: bool = True,
        with_keys: bool = False,
        timeout_s: float = 600.0,
        settings: storage.S3Settings | None = None,
        fields: tuple[str, ...] | list[str] = (),
    ):
        checks = [
            ("world_size", world_size, world_size >= 1, ">= 1"),
            ("rank", rank, 0 <= rank < max(world_size, 1), f"0 <= rank < world_size ({world_size})"),
            ("batch_size", batch_size, batch_size >= 1, ">= 1"),
            ("shuffle_buffer", shuffle_buffer, shuffle_buffer >= 1, ">= 1"),
            ("loader_workers", loader_workers, loader_workers >= 0, ">= 0"),
            ("max_corrupt_fraction", max_corrupt_fraction, 0.0 <= max_corrupt_fraction <= 1.0, "0 <= x <= 1"),
            ("timeout_s", timeout_s, timeout_s > 0, "> 0"),
        ]
        for name, value, ok, allowed in checks:
            if not ok:
                raise ValueError(f"{name}: {value!r} is not allowed; it must be {allowed}")
        self.settings = (settings or storage.S3Settings()).with_endpoint(endpoint)
        self.manifest: Manifest = read_manifest(url, self.settings)
        m = self.manifest
        if not m.shards:
            raise ValueError(f"dataset {m.url}: the manifest lists no shards; there is nothing to read")
        empty = [s.name for s in m.shards if s.samples == 0]
        if empty:
            raise ValueError(f"dataset {m.url}: shard {empty[0]} has 0 samples; every shard must hold samples")
        self.num_workers = max(1, loader_workers)
        if len(m.shards) < world_size * self.num_workers:
            raise ValueError(
                f"dataset {m.url}: {len(m.shards)} shards cannot feed world_size={world_size} x "
                f"loader_workers={self.num_workers}; every reader needs >= 1 shard per epoch "
                "(use fewer loader workers or re-shard with a smaller --shard-size)"
            )
        if require_labels and not m.labelled:
            raise ValueError(
                f"require_labels: True is not allowed for dataset {m.url}: it has no classes (unlabelled); "
                "train unconditionally or prepare the data from a labelled source"
            )
        self.fields = tuple(fields)
        self.field_dim = check_fields(m, self.fields)
        if resolution is None:
            if m.resolution is None:
                raise ValueError(f"resolution: None is not allowed: dataset {m.url} has mixed sizes; give one")
            resolution = m.resolution
        if not 1 <= resolution <= 4096:
            raise ValueError(f"resolution: {resolution!r} is not allowed; use 1..4096")
        self.url, self.rank, self.world_size, self.batch_size = url, rank, world_size, batch_size
        self.resolution, self.hflip, self.seed, self.shuffle_buffer = resolution, hflip, seed, shuffle_buffer
        self.loader_workers, self.require_labels = loader_workers, require_labels
        self.max_corrupt_fraction, self.verify_sha256 = max_corrupt_fraction, verify_sha256
        self.with_keys, self.timeout_s = with_keys, timeout_s
        self._states = [self._fresh_state() for _ in range(self.num_workers)]
        self._consumed = 0
        self.carry: dict[str, Any] | None = None  # the rest of epochs in progress at a world-size change

    @classmethod
    def from_config(cls, data, *, rank: int, world_size: int, batch_size: int, **kwargs) -> ShardReader:
        """Build from a ``pipeline.config.DataConfig`` (keyword arguments override its fields)."""
        opts = dict(
            rank=rank,
            world_size=world_size,
            batch_size=batch_size,
            resolution=data.resolution,
            hflip=data.hflip,
            seed=data.seed,
            shuffle_buffer=data.shuffle_buffer,
            loader_workers=data.loader_workers,
            require_labels=data.require_labels,
            max_corrupt_fraction=data.max_corrupt_fraction,
            verify_sha256=data.verify_sha256,
            timeout_s=data.loader_timeout_s,
            settings=storage.settings_from_config(data),
            fields=tuple(data.fields),
        )
        opts.update(kwargs)
        return cls(data.url, **opts)

    @staticmethod
    def _fresh_state() -> dict[str, Any]:
        return {"epoch": 0, "position": 0, "yielded": 0, "skipped": 0, "skipped_by_reason": {}}

    # -- iteration ----------------------------------------------------------------------------
    def __iter__(self) -> Iterator[tuple]:
        stream = _WorkerStream(self, self._states, self._consumed % self.num_workers)
        if self.loader_workers == 0:
            batches: Any = iter(stream)
        else:
            loader = torch.utils.data.DataLoader(
                stream,
                batch_size=None,
                num_workers=self.loader_workers,
                timeout=self.timeout_s,
                prefetch_factor=2,
                persistent_workers=False,
            )
            batches = iter(loader)
        try:
            for images, labels, keys, worker, state, extras in batches:
                self._states[worker] = state
                self._consumed += 1
                out = (images, labels, keys) if self.with_keys else (images, labels)
                yield (*out, extras) if self.fields else out
        finally:
            close = getattr(batches, "close", None) or getattr(batches, "_shutdown_workers", None)
            if close is not None:
                close()

    # -- position -----------------------------------------------------------------------------
    def _identity(self) -> dict[str, Any]:
        return {
            "dataset": self.manifest.fingerprint or self.manifest.url,
            "num_shards": len(self.manifest.shards),
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "loader_workers": self.num_workers,
            "shuffle_buffer": self.shuffle_buffer,
        }

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position: per-worker (epoch, emission index) and counters."""
        return {
            "version": STATE_VERSION,
            **self._identity(),
            "consumed_batches": self._consumed,
            "workers": [dict(s, skipped_by_reason=dict(s["skipped_by_reason"])) for s in self._states],
            "carry": self._live_carry(),
        }

    def _live_carry(self) -> dict[str, Any] | None:
        """The carry while some worker is still in one of its epochs (dropped once all are past it)."""
        if self.carry is None or min(s["epoch"] for s in self._states) > int(self.carry["last"]):
            return None
        return self.carry

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where the reader that saved ``state`` stopped."""
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ValueError(f"state: not a ShardReader state of version {STATE_VERSION}")
        for key, value in self._identity().items():
            if state.get(key) != value:
                raise ValueError(
                    f"state: {key} was {state.get(key)!r} when saved but is {value!r} now; an exact resume "
                    "needs the same dataset, seed, rank, world_size, loader_workers and shuffle_buffer"
                )
        workers = state.get("workers")
        if not isinstance(workers, list) or len(workers) != self.num_workers:
            raise ValueError(f"state: expected {self.num_workers} worker positions")
        self._states = [
            {
                "epoch": int(w["epoch"]),
                "position": int(w["position"]),
                "yielded": int(w["yielded"]),
                "skipped": int(w["skipped"]),
                "skipped_by_reason": {str(k): int(v) for k, v in w["skipped_by_reason"].items()},
            }
            for w in workers
        ]
        self._consumed = int(state["consumed_batches"])
        self.carry = state.get("carry")

    def load_resplit(self, states: list[dict[str, Any]]) -> None:
        """Continue from the states of all ranks of a run at another world size (elastic resume).

        ``states[r]`` is old rank r's :meth:`state_dict`. The samples the old readers consumed in the
        epochs in progress are removed; the rest is split over this run's readers
        (:func:`resplit_carry`). Dataset, seed and shuffle buffer must be the same.
        """
        if not states or not all(isinstance(st, dict) and st.get("version") == STATE_VERSION for st in states):
            raise ValueError(f"states: not a list of ShardReader states of version {STATE_VERSION}")
        fixed = {k: v for k, v in self._identity().items() if k not in ("rank", "world_size", "loader_workers")}
        old_world, old_workers = len(states), int(states[0]["loader_workers"])
        carries = {json.dumps(st.get("carry"), sort_keys=True) for st in states}
        for r, st in enumerate(states):
            for key, value in fixed.items():
                if st.get(key) != value:
                    raise ValueError(
                        f"state: {key} was {st.get(key)!r} when saved but is {value!r} now; resuming at another "
                        "world size needs the same dataset, seed and shuffle_buffer")
            if st.get("rank") != r or st.get("world_size") != old_world or int(st["loader_workers"]) != old_workers \
                    or len(st.get("workers", [])) != old_workers:
                raise ValueError(f"states: entry {r} is rank {st.get('rank')} of {st.get('world_size')} with "
                                 f"{st.get('loader_workers')} loader workers; expected rank {r} of {old_world} "
                                 f"with {old_workers}, as written by one run")
        if len(carries) != 1:
            raise ValueError("states: the ranks disagree on the carried-over samples; they are not from one checkpoint")
        counts = np.array([sh.samples for sh in self.manifest.shards], dtype=np.int64)
        positions = [[(int(w["epoch"]), int(w["position"])) for w in st["workers"]] for st in states]
        self.carry, start = resplit_carry(counts, self.seed, self.shuffle_buffer, old_world, old_workers,
                                          positions, states[0].get("carry"))
        self._states = [dict(self._fresh_state(), epoch=start) for _ in range(self.num_workers)]
        self._consumed = 0

    # -- counters -----------------------------------------------------------------------------
    @property
    def counters(self) -> dict[str, Any]:
        """Samples yielded and skipped (by reason), summed over this rank's loader workers."""
        reasons: dict[str, int] = {}
        for s in self._states:
            for k, v in s["skipped_by_reason"].items():
                reasons[k] = reasons.get(k, 0) + v
        yielded = sum(s["yielded"] for s in self._states)
        skipped = sum(s["skipped"] for s in self._states)
        return {
            "yielded": yielded,
            "skipped": skipped,
            "skipped_fraction": skipped / max(yielded + skipped, 1),
            "skipped_by_reason": reasons,
            "epoch": min(s["epoch"] for s in self._states),
        }

    @property
    def epoch_samples(self) -> int:
        """Samples in one full epoch over all ranks."""
        return self.manifest.num_samples

    def __repr__(self) -> str:
        return (
            f"ShardReader({self.manifest.url!r}, rank={self.rank}/{self.world_size}, batch={self.batch_size}, "
            f"res={self.resolution}, workers={self.loader_workers}, shards={len(self.manifest.shards)})"
        )


def iter_dataset(
    url: str,
    batch_size: int,
    resolution: int | None = None,
    settings: storage.S3Settings | None = None,
    shard_indices: list[int] | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
    """One pass over the dataset in manifest order, no shuffle or flip: ``(images, labels, keys)``.

    For reference statistics (evaluation) and inspection. The last batch may be short. Bad
    samples raise (a reference set must be complete); shards are checked against their sha256.
    ``shard_indices`` restricts the pass to some shards (e.g. one share per worker).
    """
    manifest = read_manifest(url, settings)
    res = resolution or manifest.resolution
    if res is None:
        raise ValueError(f"resolution: None is not allowed: dataset {manifest.url} has mixed sizes; give one")
    if batch_size < 1:
        raise ValueError(f"batch_size: {batch_size!r} is not allowed; it must be >= 1")
    images: list[np.ndarray] = []
    labels: list[int] = []
    keys: list[str] = []

    def flush():
        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0).contiguous()
        return x, torch.tensor(labels, dtype=torch.int64), list(keys)

    for i in range(len(manifest.shards)) if shard_indices is None else shard_indices:
        shard_url, info = manifest.shard_url(i), manifest.shards[i]
        result = ShardRead()
        count = 0
        for sample in iter_shard_samples(shard_url, settings, result):
            data = next((sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample), None)
            if data is None:
                raise ValueError(f"{shard_url}: sample {sample['__key__']} has no image member")
            images.append(center_crop_resize(decode_image(data), res))
            labels.append(int(sample["cls"].decode()) if "cls" in sample else -1)
            keys.append(sample["__key__"])
            count += 1
            if len(keys) == batch_size:
                yield flush()
                images, labels, keys = [], [], []
        if result.error or count != info.samples:
            raise ValueError(f"{shard_url}: {count} of {info.samples} samples readable ({result.error or 'short shard'})")
        if result.sha256 != info.sha256:
            raise ShardIntegrityError(f"{shard_url}: sha256 {result.sha256} does not match the manifest's {info.sha256}")
    if keys:
        yield flush()


def read_fields(
    url: str, fields: tuple[str, ...] = ("clip_img", "clip_txt"), settings: storage.S3Settings | None = None,
    max_shards: int | None = None,
) -> dict[str, Any]:
    """Every sample's key, label, caption and ``fields`` vectors, in manifest order, without decoding
    images: ``{"keys": [...], "labels": int64 (N,), "captions": [str | None], field: float32 (N, d)}``.
    For held-out evaluation of embeddings (the prior's baselines, retrieval). ``max_shards``: only the
    first shards of the manifest."""
    manifest = read_manifest(url, settings)
    dim = check_fields(manifest, tuple(fields))
    keys: list[str] = []
    labels: list[int] = []
    captions: list[str | None] = []
    vectors: dict[str, list[np.ndarray]] = {f: [] for f in fields}
    for i, info in enumerate(manifest.shards[:max_shards]):
        shard_url, result, count = manifest.shard_url(i), ShardRead(), 0
        for sample in iter_shard_samples(shard_url, settings, result):
            sample["__url__"] = shard_url
            for f, vec in decode_fields(sample, tuple(fields), dim).items():
                vectors[f].append(vec)
            keys.append(sample["__key__"])
            labels.append(int(sample["cls"].decode()) if "cls" in sample else -1)
            captions.append(sample["txt"].decode("utf-8") if "txt" in sample else None)
            count += 1
        if result.error or count != info.samples:
            raise ValueError(f"{shard_url}: {count} of {info.samples} samples readable ({result.error or 'short shard'})")
    out: dict[str, Any] = {"keys": keys, "labels": torch.tensor(labels, dtype=torch.int64), "captions": captions}
    for f in fields:
        out[f] = torch.from_numpy(np.stack(vectors[f])) if vectors[f] else torch.zeros(0, dim or 0)
    return out
