"""Post-hoc EMA (EDM2): any EMA length, chosen after training, from the run's snapshots.

    from pipeline.posthoc import reconstruct

    state = reconstruct("runs/quickstart", 0.07)                    # at the last snapshot
    state = reconstruct("runs/quickstart", 0.13, at_images=32768)   # at an earlier time

Training (``train.posthoc_ema``) tracks power-function EMAs and stores snapshots of them in
``<run>/posthoc_ema/<images seen>/`` (:mod:`pipeline.train.posthoc_snapshots`). A profile with
relative standard deviation ``sigma_rel`` at time T is the least-squares combination of every
stored profile with time <= T (:func:`pipeline.diffusion.phema.posthoc_weights`). The weights are
summed snapshot by snapshot and rank file by rank file, so memory holds one full state and one
rank's file at a time, whatever the number of snapshots or the ZeRO stage that wrote them.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as st_load

from pipeline.diffusion.phema import check_sigma_rel, gamma_from_sigma_rel, posthoc_weights
from pipeline.train.posthoc_snapshots import MANIFEST, POSTHOC_DIR
from pipeline.train.rundir import RunDir

__all__ = ["PosthocPlan", "Snapshot", "committed_snapshots", "posthoc_plan", "reconstruct"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Snapshot:
    images_seen: int
    rel: str  # e.g. "posthoc_ema/000000001024"
    manifest: dict[str, Any]


@dataclass(frozen=True)
class PosthocPlan:
    """Which stored profiles make the target profile, with what weights."""

    run_url: str
    sigma_rel: float
    gamma: float
    at_images: int
    snapshots: tuple[Snapshot, ...]  # those used (time <= at_images), oldest first
    columns: tuple[tuple[int, float], ...]  # (snapshot index, tracked sigma_rel) of each weight
    weights: np.ndarray
    relative_error: float  # L2 misfit of the combined profile, relative to the target's norm

    def provenance(self) -> dict[str, Any]:
        """What an export's config.json / an evaluation's metrics.json records about the weights."""
        return {
            "method": "post-hoc EMA (Karras et al. 2024, EDM2): least-squares combination of power-function EMA "
                      "snapshots (their algorithm 3)",
            "run": self.run_url,
            "sigma_rel": self.sigma_rel,
            "gamma": self.gamma,
            "at_images": self.at_images,
            "tracked_sigma_rels": sorted({s for _, s in self.columns}),
            "num_snapshots": len(self.snapshots),
            "snapshot_images": [s.images_seen for s in self.snapshots],
            "profile_relative_error": self.relative_error,
            "max_abs_weight": float(np.abs(self.weights).max()),
        }


def committed_snapshots(run_url: str) -> list[Snapshot]:
    """Snapshots with a manifest, oldest first; a folder without one (half-written) is ignored."""
    run = RunDir(run_url)
    out = []
    for name in run.list_dirs(POSTHOC_DIR):
        if not name.isdigit():
            continue
        rel = f"{POSTHOC_DIR}/{name}"
        if not run.exists(f"{rel}/{MANIFEST}"):
            log.info("post-hoc EMA snapshot %s has no manifest (half-written); ignored", name)
            continue
        try:
            manifest = json.loads(run.read_bytes(f"{rel}/{MANIFEST}"))
        except (ValueError, OSError) as exc:
            log.warning("post-hoc EMA snapshot %s: unreadable manifest (%s); ignored", name, exc)
            continue
        out.append(Snapshot(int(name), rel, manifest))
    return sorted(out, key=lambda s: s.images_seen)


def posthoc_plan(run_url: str, sigma_rel: float, at_images: int | str | None = None) -> PosthocPlan:
    """The least-squares weights of the run's stored profiles for ``(at_images, sigma_rel)``.

    ``at_images`` None or 'latest': the last snapshot; else a time in images seen (an int, or a
    string of one, as a ``--checkpoint`` flag gives it). ValueError for a sigma_rel outside
    (0, 0.2887), a time that is not a number, a run without snapshots, or a time outside
    (first snapshot, last snapshot]."""
    sigma = check_sigma_rel(sigma_rel, "posthoc sigma_rel")
    if at_images == "latest":
        at_images = None
    if at_images is not None:
        try:
            at_images = int(at_images)
        except (TypeError, ValueError):
            raise ValueError(f"checkpoint: {at_images!r} is not allowed with a post-hoc EMA; use 'latest' (the last "
                             "snapshot) or a time in images seen") from None
    snaps = committed_snapshots(run_url)
    if not snaps:
        raise ValueError(f"run {run_url!r} has no post-hoc EMA snapshots ({POSTHOC_DIR}/*/{MANIFEST}); train with "
                         f"train.posthoc_ema.snapshot_every_images > 0 to make them")
    times = [s.images_seen for s in snaps]
    if at_images is None:
        at_images = times[-1]
    at_images = int(at_images)
    if at_images > times[-1]:
        raise ValueError(f"posthoc at_images: {at_images} is after the last snapshot ({times[-1]} images) of run "
                         f"{run_url!r}; allowed: {times[0]} to {times[-1]}")
    used = tuple(s for s in snaps if s.images_seen <= at_images)
    if not used:
        raise ValueError(f"posthoc at_images: {at_images} is before the first snapshot ({times[0]} images) of run "
                         f"{run_url!r}; allowed: {times[0]} to {times[-1]}")
    columns, col_times, col_gammas = [], [], []
    for i, snap in enumerate(used):
        for s, g in zip(snap.manifest["sigma_rels"], snap.manifest["gammas"]):
            columns.append((i, float(s)))
            col_times.append(snap.images_seen)
            col_gammas.append(float(g))
    gamma = gamma_from_sigma_rel(sigma)
    solution = posthoc_weights(col_times, col_gammas, at_images, gamma)
    return PosthocPlan(run_url, sigma, gamma, at_images, used, tuple(columns), solution.weights,
                       solution.relative_error)


def _read_verified(run: RunDir, snap: Snapshot, fname: str) -> bytes:
    raw = run.read_bytes(f"{snap.rel}/{fname}")
    meta = snap.manifest["files"].get(fname)
    if meta is not None and hashlib.sha256(raw).hexdigest() != meta["sha256"]:
        raise ValueError(f"post-hoc EMA snapshot {snap.rel}: {fname} fails its sha256 check (corrupted)")
    return raw


def _metadata(raw: bytes) -> dict[str, str]:
    header_len = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + header_len]).get("__metadata__", {})


@torch.no_grad()
def reconstruct(run_url: str, sigma_rel: float, at_images: int | None = None, *,
                plan: PosthocPlan | None = None) -> dict[str, torch.Tensor]:
    """Full fp32 weights (``net.*`` and ``objective.*``, like a checkpoint's EMA) of the power-function
    EMA with relative std ``sigma_rel`` at ``at_images`` (default: the last snapshot), from the run's
    snapshots of any ZeRO stage. Accumulated in float64, one rank file at a time."""
    plan = plan or posthoc_plan(run_url, sigma_rel, at_images)
    run = RunDir(run_url)
    weights_of: dict[int, dict[float, float]] = {}
    for (i, s), w in zip(plan.columns, plan.weights):
        weights_of.setdefault(i, {})[s] = float(w)
    full: dict[str, torch.Tensor] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for i, snap in enumerate(plan.snapshots):
        for fname in snap.manifest["rank_files"]:
            raw = _read_verified(run, snap, fname)
            slices = json.loads(_metadata(raw)["slices"])
            tensors = st_load(raw)
            for name, (start, length, *shape) in slices.items():
                if name not in full:
                    full[name] = torch.zeros(int(np.prod(shape, dtype=np.int64)), dtype=torch.float64)
                    shapes[name] = tuple(shape)
                if not length:
                    continue
                target = full[name][start:start + length]
                for s, w in weights_of[i].items():
                    target.add_(tensors[f"{s!r}/{name}"].reshape(-1)[:length].double(), alpha=w)
            del tensors, raw
    return {name: flat.float().view(*shapes[name]) for name, flat in full.items()}
