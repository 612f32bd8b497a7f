"""Where evaluation results go: metrics.json, an appended table, TensorBoard and a PNG plot.

``<run>/eval/<checkpoint>/<name>/metrics.json``  full provenance of one evaluation
``<run>/eval/metrics.tsv``                       one row per evaluation, appended
``<run>/eval/metrics.png``                       each metric against images seen, redrawn
``<run>/logs/eval/``                             TensorBoard scalars ``eval/<name>/<metric>``
"""

from __future__ import annotations

import csv
import io
import json
import platform
import shutil
import statistics
import tempfile
from collections.abc import Mapping
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from pipeline.data import storage

__all__ = ["TABLE_COLUMNS", "append_table", "interval_columns", "library_versions", "plot_metrics", "read_table",
           "seed_spread", "write_metrics_json", "write_tensorboard"]

INTERVAL_METRICS = ("fid", "sfid", "fd_dinov2", "precision", "recall", "kid")
TABLE_COLUMNS = ("checkpoint", "images_seen", "name", "num_samples", "fid", "sfid", "fd_dinov2", "is", "precision",
                 "recall", "kid", "bpd", "probe_accuracy", "probe_random_accuracy", "probe_pca_accuracy",
                 *(f"{m}_{end}" for m in INTERVAL_METRICS for end in ("low", "high")),
                 "feature_extractor", "created_utc")
PLOTTED = ("fid", "sfid", "fd_dinov2", "is", "precision", "recall", "kid", "bpd", "probe_accuracy")


def interval_columns(intervals: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """metrics.json's ``intervals`` as table columns ``<metric>_low``, ``<metric>_high``."""
    return {f"{m}_{end}": iv[end] for m, iv in intervals.items() for end in ("low", "high")}


def seed_spread(records: list[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each scalar metric over evaluations of several seed sets: the values, their mean and sample std."""
    out: dict[str, dict[str, Any]] = {}
    keys = sorted({k for r in records for k, v in r["metrics"].items() if isinstance(v, (int, float))})
    for key in keys:
        values = [float(r["metrics"][key]) for r in records if isinstance(r["metrics"].get(key), (int, float))]
        if len(values) == len(records):
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            out[key] = {"values": values, "mean": statistics.fmean(values), "std": std}
    return out


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("torch", "torch-fidelity", "numpy", "scipy", "ray", "diffusion-pipeline"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def write_metrics_json(url: str, record: Mapping[str, Any]) -> None:
    """Written last in an evaluation folder: its presence marks the evaluation as done."""
    storage.write_bytes(url, (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())


def read_table(url: str) -> list[dict[str, str]]:
    if not storage.exists(url):
        return []
    return list(csv.DictReader(io.StringIO(storage.read_bytes(url).decode()), delimiter="\t"))


def append_table(url: str, row: Mapping[str, Any]) -> list[dict[str, str]]:
    """Append one row (read, extend, rewrite: object stores have no append); returns all rows."""
    rows = read_table(url)
    rows.append({c: "" if row.get(c) is None else str(row.get(c)) for c in TABLE_COLUMNS})
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=TABLE_COLUMNS, delimiter="\t", extrasaction="ignore",
                            lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    storage.write_bytes(url, buffer.getvalue().encode())
    return rows


def plot_metrics(rows: list[dict[str, str]], url: str) -> None:
    """One panel per metric, x = images seen, one line per evaluation name; bootstrap intervals as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = [m for m in PLOTTED if any(r.get(m) for r in rows)]
    if not present:
        return
    fig, axes = plt.subplots(1, len(present), figsize=(4 * len(present), 3.2), squeeze=False)
    for ax, metric in zip(axes[0], present):
        for name in sorted({r["name"] for r in rows}):
            points = sorted((int(r["images_seen"]), float(r[metric]), r.get(f"{metric}_low"), r.get(f"{metric}_high"))
                            for r in rows if r["name"] == name and r.get(metric))
            if points:
                xs, ys = [p[0] for p in points], [p[1] for p in points]
                line, = ax.plot(xs, ys, marker="o", label=name)
                bars = [(x, y, float(lo), float(hi)) for x, y, lo, hi in points if lo and hi]
                if bars:  # the percentile interval need not be centred on (or contain) the estimate
                    ax.vlines([b[0] for b in bars], [b[2] for b in bars], [b[3] for b in bars],
                              colors=line.get_color(), alpha=0.6, linewidth=2)
        ax.set_title(metric)
        ax.set_xlabel("images seen")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize="small")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    storage.write_bytes(url, buffer.getvalue())


def write_tensorboard(log_url: str, name: str, images_seen: int, metrics: Mapping[str, float | None]) -> None:
    """Scalars ``eval/<name>/<metric>`` at step = images seen (staged locally for s3:// runs)."""
    from torch.utils.tensorboard import SummaryWriter

    local = not storage.is_s3(log_url)
    log_dir = log_url if local else tempfile.mkdtemp(prefix="eval-tb-")
    try:
        with SummaryWriter(log_dir=log_dir) as writer:
            for key, value in metrics.items():
                if value is not None:
                    writer.add_scalar(f"eval/{name}/{key}", float(value), global_step=int(images_seen))
        if not local:
            for path in Path(log_dir).rglob("*"):
                if path.is_file():
                    storage.upload_file(path, storage.join(log_url, path.relative_to(log_dir).as_posix()))
    finally:
        if not local:
            shutil.rmtree(log_dir, ignore_errors=True)
