"""The run directory (a local path or an ``s3://`` prefix) as a few file operations.

Local paths use the filesystem directly (renames are atomic); ``s3://`` goes through
``pipeline.data.storage`` (boto3 with timeouts and botocore retries).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

__all__ = ["RunDir", "sha256_file"]

_CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


class RunDir:
    """File operations relative to the run directory ``url``."""

    def __init__(self, url: str):
        if not url:
            raise ValueError("run_dir: '' is not allowed; give a local path or an s3://bucket/prefix URL")
        self.url = url.rstrip("/")
        self.is_s3 = self.url.startswith("s3://")
        if "://" in self.url and not self.is_s3:
            raise ValueError(f"run_dir: {url!r} is not allowed; use a local path or s3://bucket/prefix")

    # -- naming ---------------------------------------------------------------------------------
    def join(self, rel: str) -> str:
        return f"{self.url}/{rel}" if rel else self.url

    def local_path(self, rel: str = "") -> Path:
        if self.is_s3:
            raise ValueError(f"run_dir: {self.url!r} is not a local path")
        return Path(self.url) / rel if rel else Path(self.url)

    # -- operations -----------------------------------------------------------------------------
    def write_bytes(self, rel: str, data: bytes) -> None:
        if self.is_s3:
            from pipeline.data import storage

            storage.write_bytes(self.join(rel), data)
            return
        path = self.local_path(rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic: a reader sees the old file or the whole new one

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode())

    def read_bytes(self, rel: str) -> bytes:
        if self.is_s3:
            from pipeline.data import storage

            return storage.read_bytes(self.join(rel))
        return self.local_path(rel).read_bytes()

    def exists(self, rel: str) -> bool:
        if self.is_s3:
            from pipeline.data import storage

            return storage.exists(self.join(rel))
        return self.local_path(rel).exists()

    def list_dirs(self, rel: str) -> list[str]:
        """Names of the immediate sub-folders of ``rel`` (empty when it does not exist)."""
        if self.is_s3:
            from pipeline.data import storage

            return storage.list_dir(self.join(rel))
        path = self.local_path(rel)
        return sorted(p.name for p in path.iterdir() if p.is_dir()) if path.is_dir() else []

    def put_file(self, local: str | os.PathLike, rel: str, move: bool = False) -> None:
        """Store a local file at ``rel`` (moved when ``move`` and the run dir is local)."""
        if self.is_s3:
            from pipeline.data import storage

            storage.upload_file(str(local), self.join(rel))
            return
        dest = self.local_path(rel)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if move:
            os.replace(local, dest)
        else:
            shutil.copyfile(local, dest)

    def get_file(self, rel: str, local: str | os.PathLike) -> None:
        Path(local).parent.mkdir(parents=True, exist_ok=True)
        if self.is_s3:
            from pipeline.data import storage

            storage.download_file(self.join(rel), str(local))
            return
        shutil.copyfile(self.local_path(rel), local)

    def sha256(self, rel: str) -> str:
        if self.is_s3:
            from pipeline.data import storage

            return hashlib.sha256(storage.read_bytes(self.join(rel))).hexdigest()
        return sha256_file(self.local_path(rel))

    def delete_tree(self, rel: str) -> None:
        if self.is_s3:
            from pipeline.data import storage

            storage.delete_prefix(self.join(rel).rstrip("/") + "/")
            return
        shutil.rmtree(self.local_path(rel), ignore_errors=True)
