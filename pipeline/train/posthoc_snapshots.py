"""Snapshots of the power-function EMAs (post-hoc EMA, EDM2) in the run directory.

Layout: ``<run>/posthoc_ema/<images seen, 12 digits>/`` holds ``phema_rank_RRRRR.safetensors`` (each
rank's slices of every tracked profile, keyed ``"<sigma_rel>/<param>"``, with the slice table in
the safetensors metadata) and ``manifest.json``, written last by rank 0 once every rank's file is
stored: a folder without a manifest is a half-written snapshot and is ignored by readers
(:mod:`pipeline.posthoc`). The manifest records the tracked sigma_rels and exponents, the world
size and the sha256 and size of every file. Local files move into place by rename; s3:// objects
appear whole.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from safetensors.torch import save_file as st_save_file

from pipeline.train import dist
from pipeline.train.checkpoint import checkpoint_name
from pipeline.train.ema import PowerEMA
from pipeline.train.rundir import RunDir, sha256_file

__all__ = ["MANIFEST", "POSTHOC_DIR", "discard_snapshots_after", "save_snapshot", "snapshot_name"]

POSTHOC_DIR = "posthoc_ema"
MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def snapshot_name(images_seen: int) -> str:
    return checkpoint_name(images_seen)  # the same 12-digit names as checkpoints


def rank_file(rank: int) -> str:
    return f"phema_rank_{rank:05d}.safetensors"


def _staging(run: RunDir) -> Path:
    return run.staging_dir(POSTHOC_DIR, prefix=f"rank{dist.rank()}-")


def save_snapshot(run_url: str, phema: PowerEMA, *, images_seen: int, config_hash: str, model_hash: str) -> str:
    """Collective: every rank stores its slices of every profile; rank 0 writes the manifest last.
    Returns the snapshot's path relative to the run dir."""
    run = RunDir(run_url)
    rel = f"{POSTHOC_DIR}/{snapshot_name(images_seen)}"
    rank = dist.rank()
    fname = rank_file(rank)
    staging = _staging(run)
    try:
        path = staging / fname
        st_save_file(phema.local_state(), str(path),
                     metadata={"slices": json.dumps(phema.slice_table()), "sigma_rels": json.dumps(phema.sigma_rels),
                               "images_seen": str(images_seen)})
        mine = {"rank": rank, "file": fname, "sha256": sha256_file(path), "size": path.stat().st_size}
        run.put_file(path, f"{rel}/{fname}", move=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    everyone = dist.all_gather_object(mine)
    if rank == 0:
        manifest: dict[str, Any] = {
            "format": FORMAT_VERSION,
            "images_seen": images_seen,
            "world_size": len(everyone),
            "sigma_rels": list(phema.sigma_rels),
            "gammas": list(phema.gammas),
            "num_updates": phema.num_updates,
            "created_unix": time.time(),
            "config_hash": config_hash,
            "model_hash": model_hash,
            "rank_files": [r["file"] for r in sorted(everyone, key=lambda r: r["rank"])],
            "files": {r["file"]: {"sha256": r["sha256"], "size": r["size"], "rank": r["rank"]} for r in everyone},
        }
        run.write_text(f"{rel}/{MANIFEST}", json.dumps(manifest, indent=1))
    dist.barrier()
    return rel


def discard_snapshots_after(run_url: str, images_seen: int) -> list[str]:
    """Remove snapshots later than ``images_seen`` (left by a run that went on past the checkpoint it
    is resumed from; the resumed run writes them again) and staging leftovers. Main rank only."""
    run = RunDir(run_url)
    run.delete_tree(f"{POSTHOC_DIR}/.staging")
    removed = []
    for name in run.list_dirs(POSTHOC_DIR):
        if name.isdigit() and int(name) > images_seen:
            run.delete_tree(f"{POSTHOC_DIR}/{name}")
            removed.append(name)
    return removed
