"""Training observability: TensorBoard scalars + metrics.jsonl (rank 0), a progress bar, sample grids."""

from __future__ import annotations

import io
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from pipeline.train.rundir import RunDir

__all__ = ["MetricsLogger", "Progress", "image_grid_png", "quartile_of", "quartile_of_time"]


def quartile_of(t_index: torch.Tensor, num_timesteps: int) -> torch.Tensor:
    """Timestep quartile 0..3 of each example (Improved DDPM fig. 2 plots the loss per quartile)."""
    return torch.clamp((t_index * 4) // num_timesteps, 0, 3)


def quartile_of_time(time: torch.Tensor) -> torch.Tensor:
    """Quartile 0..3 of each example's diffusion time in [0, 1] (discrete: t / T, as :func:`quartile_of`)."""
    return torch.clamp(torch.floor(time.double() * 4), 0, 3).long()


class MetricsLogger:
    """Appends one JSON line per log point to ``<run>/logs/metrics.jsonl`` and writes the same scalars
    as TensorBoard events under ``<run>/logs/``. Does nothing on ranks other than 0."""

    def __init__(self, run_url: str, enabled: bool):
        self.enabled = enabled
        self.run = RunDir(run_url)
        self._writer = None
        self._lines: list[str] = []
        self._tb_local: Path | None = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        if self.run.is_s3:
            self._tb_local = Path(tempfile.mkdtemp(prefix="tb-"))
            logdir = self._tb_local
        else:
            logdir = self.run.local_path("logs")
            logdir.mkdir(parents=True, exist_ok=True)
        self._writer = SummaryWriter(log_dir=str(logdir), flush_secs=30)

    def log(self, images_seen: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if v is not None and math.isfinite(float(v)) else None) for k, v in scalars.items()}
        line = json.dumps({"images_seen": images_seen, "time": time.time(), **clean})
        if self.run.is_s3:
            self._lines.append(line)
        else:
            path = self.run.local_path("logs/metrics.jsonl")
            with open(path, "a") as f:
                f.write(line + "\n")
        for k, v in clean.items():
            if v is not None:
                self._writer.add_scalar(f"train/{k}", v, images_seen)

    def flush(self) -> None:
        """Persist buffered logs (s3: rewrite metrics.jsonl and upload event files)."""
        if not self.enabled:
            return
        self._writer.flush()
        if self.run.is_s3:
            rel = "logs/metrics.jsonl"
            old = self.run.read_bytes(rel).decode() if self.run.exists(rel) else ""
            self.run.write_text(rel, old + "".join(line + "\n" for line in self._lines))
            self._lines.clear()
            for path in self._tb_local.iterdir():
                self.run.put_file(path, f"logs/{path.name}")

    def close(self) -> None:
        if self.enabled:
            self.flush()
            self._writer.close()


class Progress:
    """Rank 0's progress bar in images: images/s, loss, ETA (tqdm), a no-op elsewhere."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="img", unit_scale=True, dynamic_ncols=True,
                            mininterval=1.0, file=sys.stderr, desc="train")

    def update(self, n: int, **postfix: Any) -> None:
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()},
                                     refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def image_grid_png(images: torch.Tensor, nrow: int) -> bytes:
    """PNG bytes of a grid of images in [-1, 1], shape (N, C, H, W)."""
    from PIL import Image

    n, c, h, w = images.shape
    ncol = nrow
    nrows = math.ceil(n / ncol)
    pad = 2
    grid = torch.ones(c, nrows * (h + pad) + pad, ncol * (w + pad) + pad)
    x = ((images.float().clamp(-1, 1) + 1) / 2).cpu()
    for i in range(n):
        r, col = divmod(i, ncol)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = x[i]
    arr = (grid * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    if c == 1:
        arr = arr[..., 0]
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()
