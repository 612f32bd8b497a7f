"""Sharded checkpoints: DeepSpeed's per-rank files, per-rank EMA slices, and a manifest.

Layout: ``<run>/checkpoints/<images seen, 12 digits>/`` holds DeepSpeed's files for tag ``state``
(``state/mp_rank_00_model_states.pt``, ``state/zero_pp_rank_R_...``), ``ema_rank_RRRRR.safetensors``
and ``manifest.json``. The manifest is written last, by rank 0, after every rank has stored its
files: a folder without one is not a checkpoint. It records images seen, step, each rank's data
cursor and RNG states, the EMA layout, the loss scale, the importance-sampler history, the config
hash and the sha256 and size of every file.

A checkpoint resumes with another number of workers too: :func:`load_checkpoint` then re-splits
DeepSpeed's partitions (:mod:`pipeline.train.elastic`) and the EMA slices over the new ranks.

Reading EMA weights (:func:`load_ema_weights`) needs neither DeepSpeed nor Ray nor pickle.
"""

from __future__ import annotations

import base64
import json
import logging
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save_file as st_save_file

from pipeline.train import dist
from pipeline.train.ema import EMA, PowerEMA, assemble_full
from pipeline.train.rundir import RunDir, sha256_file

__all__ = [
    "CHECKPOINTS",
    "MANIFEST",
    "Checkpoint",
    "capture_rng",
    "checkpoint_name",
    "committed_checkpoints",
    "find_resume_checkpoint",
    "from_jsonable",
    "load_ema_weights",
    "restore_rng",
    "retained",
    "save_checkpoint",
    "to_jsonable",
]

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
DS_TAG = "state"
FORMAT_VERSION = 1


def checkpoint_name(images_seen: int) -> str:
    return f"{images_seen:012d}"


# ---------------------------------------------------------------------------------------------
# JSON codec for small state (cursors, RNG, sampler history): tensors and arrays as base64.


def to_jsonable(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        return {"__tensor__": base64.b64encode(t.view(torch.uint8).numpy().tobytes()
                                               if t.numel() else b"").decode(),
                "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": base64.b64encode(np.ascontiguousarray(obj).tobytes()).decode(),
                "dtype": obj.dtype.str, "shape": list(obj.shape)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"state value of type {type(obj).__name__} cannot be stored in a manifest")


def from_jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            dtype = getattr(torch, obj["dtype"])
            raw = bytearray(base64.b64decode(obj["__tensor__"]))
            flat = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
            return flat.view(dtype).reshape(obj["shape"]).clone()
        if "__ndarray__" in obj:
            return np.frombuffer(base64.b64decode(obj["__ndarray__"]), dtype=np.dtype(obj["dtype"])) \
                .reshape(obj["shape"]).copy()
        return {k: from_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [from_jsonable(v) for v in obj]
    return obj


def capture_rng() -> dict[str, Any]:
    """Every RNG a training step may touch (dropout uses torch's global generator)."""
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()),
             "numpy": np.random.get_state(legacy=False)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---------------------------------------------------------------------------------------------
# Retention and discovery


def retained(images: list[int], keep_last: int, keep_every: int) -> set[int]:
    """Checkpoints to keep: the newest ``keep_last``, plus the first at or past each multiple of
    ``keep_every`` images (0 disables the second rule)."""
    if keep_last < 1:
        raise ValueError(f"keep_last: {keep_last!r} is not allowed; keep at least 1 checkpoint")
    ordered = sorted(images)
    keep = set(ordered[-keep_last:])
    if keep_every > 0:
        prev = -1
        for n in ordered:
            if n >= keep_every and (prev < 0 or n // keep_every > prev // keep_every):
                keep.add(n)
            prev = n
    return keep


@dataclass(frozen=True)
class Checkpoint:
    """A committed checkpoint; its manifest.json as read (``manifest``) and typed (the properties)."""

    images_seen: int
    rel: str  # path relative to the run dir, e.g. "checkpoints/000000001024"
    manifest: dict[str, Any]

    @property
    def name(self) -> str:
        return self.rel.rsplit("/", 1)[-1]

    @property
    def step(self) -> int | None:
        return self.manifest.get("step")

    @property
    def world_size(self) -> int | None:
        return self.manifest.get("world_size")

    @property
    def config_hash(self) -> str | None:
        return self.manifest.get("config_hash")

    @property
    def model_hash(self) -> str | None:
        return self.manifest.get("model_hash")

    @property
    def ema_rates(self) -> list[float]:
        return [float(r) for r in self.manifest.get("ema", {}).get("rates", [])]

    @property
    def ema_files(self) -> list[str]:
        return list(self.manifest.get("ema", {}).get("files", []))

    @property
    def ema_updates(self) -> int | None:
        return self.manifest.get("ema", {}).get("num_updates")

    @property
    def files(self) -> dict[str, Any]:
        """File name -> {"sha256", ...} of every file the checkpoint holds."""
        return dict(self.manifest.get("files", {}))


def _read_manifest(run: RunDir, name: str) -> dict[str, Any] | None:
    rel = f"{CHECKPOINTS}/{name}/{MANIFEST}"
    if not run.exists(rel):
        return None
    try:
        manifest = json.loads(run.read_bytes(rel))
    except (ValueError, OSError) as exc:
        log.warning("checkpoint %s: unreadable manifest (%s); skipped", name, exc)
        return None
    return manifest


def committed_checkpoints(run_url: str) -> list[Checkpoint]:
    """Checkpoints that have a manifest, oldest first (checksums not verified)."""
    run = RunDir(run_url)
    out = []
    for name in run.list_dirs(CHECKPOINTS):
        if not name.isdigit():
            continue
        manifest = _read_manifest(run, name)
        if manifest is not None:
            out.append(Checkpoint(int(name), f"{CHECKPOINTS}/{name}", manifest))
    return sorted(out, key=lambda c: c.images_seen)


def verify_checkpoint(run: RunDir, ckpt: Checkpoint) -> str | None:
    """None when every file listed in the manifest exists with its sha256, else the problem."""
    for rel, meta in ckpt.manifest.get("files", {}).items():
        full = f"{ckpt.rel}/{rel}"
        if not run.exists(full):
            return f"file {rel} is missing"
        if run.sha256(full) != meta["sha256"]:
            return f"file {rel} fails its sha256 check"
    return None


def find_resume_checkpoint(run_url: str) -> Checkpoint | None:
    """The newest committed checkpoint whose files pass their checksums; others warn and are skipped."""
    run = RunDir(run_url)
    names = [n for n in run.list_dirs(CHECKPOINTS) if n.isdigit()]
    for name in sorted(names, reverse=True):
        manifest = _read_manifest(run, name)
        if manifest is None:
            log.warning("checkpoint %s has no manifest (not committed); skipped", name)
            continue
        ckpt = Checkpoint(int(name), f"{CHECKPOINTS}/{name}", manifest)
        problem = verify_checkpoint(run, ckpt)
        if problem:
            log.warning("checkpoint %s: %s; skipped", name, problem)
            continue
        return ckpt
    return None


def resolve_checkpoint(run_url: str, which: str | int = "latest") -> Checkpoint:
    """A committed checkpoint by images seen (or its folder name), or ``latest``."""
    ckpts = committed_checkpoints(run_url)
    if not ckpts:
        raise ValueError(f"run {run_url!r} has no committed checkpoint (no {CHECKPOINTS}/*/{MANIFEST})")
    if which == "latest":
        return ckpts[-1]
    try:
        n = int(which)
    except (TypeError, ValueError):
        raise ValueError(f"checkpoint: {which!r} is not allowed; use 'latest' or images seen, one of "
                         f"{[c.images_seen for c in ckpts]}") from None
    for c in ckpts:
        if c.images_seen == n:
            return c
    raise ValueError(f"checkpoint: {which!r} is not in run {run_url!r}; committed: "
                     f"{[c.images_seen for c in ckpts]}")


# ---------------------------------------------------------------------------------------------
# Save / load


def _staging_root(run: RunDir) -> Path:
    return run.staging_dir(CHECKPOINTS, prefix=f"rank{dist.rank()}-")


def save_checkpoint(engine, run_url: str, *, images_seen: int, step: int, ema: EMA,
                    rank_state: dict[str, Any], shared_state: dict[str, Any],
                    config_hash: str, model_hash: str, keep_last: int, keep_every: int,
                    posthoc: PowerEMA | None = None) -> str:
    """Collective: every rank stores its shard files; rank 0 writes the manifest last.

    ``posthoc``: the power-function EMAs (post-hoc EMA), stored per rank beside the EMA slices.

    ``rank_state`` (data cursor, ...) is recorded per rank; ``shared_state`` (importance sampler,
    counters) once, from rank 0. Returns the checkpoint's path relative to the run dir.
    """
    run = RunDir(run_url)
    name = checkpoint_name(images_seen)
    rel = f"{CHECKPOINTS}/{name}"
    rank, world = dist.rank(), dist.world_size()
    staging = _staging_root(run)
    try:
        (staging / DS_TAG).mkdir(parents=True, exist_ok=True)
        engine.save_checkpoint(str(staging), tag=DS_TAG, save_latest=False)
        ema_file = f"ema_rank_{rank:05d}.safetensors"
        st_save_file(ema.local_state(), str(staging / ema_file),
                     metadata={"slices": json.dumps(ema.slice_table()), "rates": json.dumps(ema.rates)})
        phema_file = f"phema_rank_{rank:05d}.safetensors" if posthoc is not None else None
        if posthoc is not None:
            st_save_file(posthoc.local_state(), str(staging / phema_file),
                         metadata={"slices": json.dumps(posthoc.slice_table()),
                                   "sigma_rels": json.dumps(posthoc.sigma_rels)})
        files: dict[str, dict[str, Any]] = {}
        for path in sorted(p for p in staging.rglob("*") if p.is_file()):
            name_in_ckpt = path.relative_to(staging).as_posix()
            if name_in_ckpt.endswith(".py"):  # DeepSpeed's zero_to_fp32.py helper script
                continue
            files[name_in_ckpt] = {"sha256": sha256_file(path), "size": path.stat().st_size, "rank": rank}
            run.put_file(path, f"{rel}/{name_in_ckpt}", move=True)
        mine = {"rank": rank, "files": files, "state": to_jsonable(rank_state), "rng": to_jsonable(capture_rng()),
                "ema_file": ema_file, "phema_file": phema_file}
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    everyone = dist.all_gather_object(mine)
    if rank == 0:
        manifest = {
            "format": FORMAT_VERSION,
            "images_seen": images_seen,
            "step": step,
            "world_size": world,
            "created_unix": time.time(),
            "config_hash": config_hash,
            "model_hash": model_hash,
            "deepspeed_tag": DS_TAG,
            "zero_stage": int(engine.zero_optimization_stage()),
            "loss_scale": _loss_scale(engine),
            "ema": {"rates": list(ema.rates), "num_updates": ema.num_updates,
                    "files": [r["ema_file"] for r in everyone]},
            "posthoc_ema": None if posthoc is None else {
                "sigma_rels": list(posthoc.sigma_rels), "num_updates": posthoc.num_updates,
                "files": [r["phema_file"] for r in everyone]},
            "ranks": [{"rank": r["rank"], "state": r["state"], "rng": r["rng"]} for r in everyone],
            "shared": to_jsonable(shared_state),
            "files": {k: v for r in everyone for k, v in r["files"].items()},
        }
        run.write_text(f"{rel}/{MANIFEST}", json.dumps(manifest, indent=1))
        _apply_retention(run, keep_last, keep_every)
    dist.barrier()
    return rel


def _loss_scale(engine) -> float | None:
    scale = getattr(engine.optimizer, "cur_scale", None)
    if scale is None:
        scale = getattr(getattr(engine.optimizer, "loss_scaler", None), "cur_scale", None)
    return float(scale) if scale is not None else None


def _apply_retention(run: RunDir, keep_last: int, keep_every: int) -> None:
    names = [n for n in run.list_dirs(CHECKPOINTS) if n.isdigit()]
    committed = [int(n) for n in names if run.exists(f"{CHECKPOINTS}/{n}/{MANIFEST}")]
    keep = retained(committed, keep_last, keep_every)
    newest = max(committed)
    for n in names:
        value = int(n)
        # Uncommitted folders older than the newest commit are leftovers of an interrupted save.
        if value not in keep and value <= newest:
            run.delete_tree(f"{CHECKPOINTS}/{n}")


def load_checkpoint(engine, run_url: str, ckpt: Checkpoint, ema: EMA,
                    posthoc: PowerEMA | None = None) -> dict[str, Any]:
    """Collective: restore the engine (weights, optimizer, LR schedule, loss scaler), this rank's
    EMA slices (and power-function EMAs, ``posthoc``) and RNG states. Returns ``{"rank_state", "shared_state",
    "images_seen", "step", "resharded": False, ...}``.

    A checkpoint written by another number of workers is re-partitioned (:mod:`pipeline.train.elastic`):
    then ``resharded`` is True, there is no ``rank_state`` (``rank_states`` holds every old rank's),
    and the RNG states are left to the caller (they were per old rank)."""
    run = RunDir(run_url)
    manifest = ckpt.manifest
    rank, world = dist.rank(), dist.world_size()
    # Elastic resume (pipeline/train/elastic.py): written by another number of workers. ZeRO 0's
    # single file loads at any world size; ZeRO 1-3 partitions are re-split here.
    resharded = manifest["world_size"] != world
    tmp = None
    if run.is_s3:
        tmp = Path(tempfile.mkdtemp(prefix="ckpt-load-"))
        # DeepSpeed reads rank 0's model states and (ZeRO 1-2) every rank's optimizer shard list.
        for rel in manifest["files"]:
            if rel.startswith(DS_TAG + "/"):
                run.get_file(f"{ckpt.rel}/{rel}", tmp / rel)
        load_dir = tmp
    else:
        load_dir = run.local_path(ckpt.rel)
    try:
        if resharded and engine.zero_optimization_stage() > 0:
            from pipeline.train.elastic import load_resharded

            load_resharded(engine, str(Path(load_dir) / manifest["deepspeed_tag"]))
        else:
            path, _ = engine.load_checkpoint(str(load_dir), tag=manifest["deepspeed_tag"], load_optimizer_states=True,
                                             load_lr_scheduler_states=True)
            if path is None:
                raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt.rel}")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    if resharded:
        ema.load_full_state(_full_slices(run, ckpt, manifest["ema"]["files"]), manifest["ema"]["num_updates"])
    else:
        ema_rel = f"{ckpt.rel}/{manifest['ema']['files'][rank]}"
        ema.load_local_state(st_load(run.read_bytes(ema_rel)), manifest["ema"]["num_updates"])
    if posthoc is not None:
        _load_posthoc(run, ckpt, posthoc, rank, resharded)
    # Every rank's state too: with another rank layout the reader re-splits the data position.
    out = {"shared_state": from_jsonable(manifest["shared"]), "images_seen": manifest["images_seen"],
           "step": manifest["step"], "resharded": resharded, "world_size": manifest["world_size"],
           "rank_states": [from_jsonable(r["state"]) for r in manifest["ranks"]]}
    if resharded:  # the RNG streams were per old rank: the caller re-keys them on (run seed, rank, images seen)
        return out
    mine = manifest["ranks"][rank]
    restore_rng(from_jsonable(mine["rng"]))
    out["rank_state"] = from_jsonable(mine["state"])
    return out


def _full_slices(run: RunDir, ckpt: Checkpoint, files: list[str]) -> dict[float, dict[str, torch.Tensor]]:
    """Full fp32 tensors of every key (EMA rate, sigma_rel) from all ranks' slice files."""
    parts = []
    for fname in files:
        raw = run.read_bytes(f"{ckpt.rel}/{fname}")
        parts.append((json.loads(_safetensors_metadata(raw)["slices"]), st_load(raw)))
    keys = sorted({k.split("/", 1)[0] for k in parts[0][1]})  # "<rate!r>/<parameter name>"
    out = {}
    for key in keys:
        prefix = f"{key}/"
        out[float(key)] = assemble_full([{"slices": meta, "tensors": {k[len(prefix):]: v for k, v in t.items()
                                                                     if k.startswith(prefix)}}
                                         for meta, t in parts])
    return out


def _load_posthoc(run: RunDir, ckpt: Checkpoint, posthoc: PowerEMA, rank: int, resharded: bool = False) -> None:
    held = ckpt.manifest.get("posthoc_ema")
    if not held:
        raise ValueError(f"train.posthoc_ema: checkpoint {ckpt.rel} holds no power-function EMA state (post-hoc EMA "
                         f"was off when it was written); resuming with it on would track wrong profiles. Start a "
                         f"new run_dir, or set train.posthoc_ema.snapshot_every_images=0")
    if [float(s) for s in held["sigma_rels"]] != list(posthoc.sigma_rels):
        raise ValueError(f"train.posthoc_ema.sigma_rels: {list(posthoc.sigma_rels)} differs from the "
                         f"{held['sigma_rels']} tracked in checkpoint {ckpt.rel}; resume with those")
    if resharded:
        posthoc.load_full_state(_full_slices(run, ckpt, held["files"]), held["num_updates"])
        return
    posthoc.load_local_state(st_load(run.read_bytes(f"{ckpt.rel}/{held['files'][rank]}")), held["num_updates"])


def load_ema_weights(run_url: str, checkpoint: str | int = "latest",
                     rate: float | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Full fp32 EMA weights (a ``state_dict`` of the bare model) of one rate from a checkpoint of any
    ZeRO stage, read from the per-rank safetensors slices. ``rate`` None picks the first rate.

    Returns ``(state_dict, manifest)``. Needs no DeepSpeed, Ray or pickle.
    """
    run = RunDir(run_url)
    ckpt = resolve_checkpoint(run_url, checkpoint)
    rates = ckpt.manifest["ema"]["rates"]
    if rate is None:
        rate = rates[0]
    match = [r for r in rates if abs(r - float(rate)) < 1e-12]
    if not match:
        raise ValueError(f"ema rate: {rate!r} is not in checkpoint {ckpt.rel}; it holds {rates}")
    prefix = f"{match[0]!r}/"
    parts = []
    for fname in ckpt.manifest["ema"]["files"]:
        raw = run.read_bytes(f"{ckpt.rel}/{fname}")
        meta = json.loads(_safetensors_metadata(raw)["slices"])
        tensors = st_load(raw)
        parts.append({"slices": meta,
                      "tensors": {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}})
    return assemble_full(parts), ckpt.manifest


def _safetensors_metadata(raw: bytes) -> dict[str, str]:
    header_len = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + header_len]).get("__metadata__", {})
