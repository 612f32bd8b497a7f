"""The run directory (a local path or an ``s3://`` prefix) as a few file operations.

Every operation goes through ``pipeline.data.storage``, the one storage layer for local paths and
S3 alike (local writes atomic by a temporary file and a rename; boto3 with timeouts and botocore
retries for S3).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from pipeline.data import storage
from pipeline.data.storage import sha256_file

__all__ = ["RunDir", "sha256_file"]


class RunDir:
    """File operations relative to the run directory ``url``."""

    def __init__(self, url: str):
        if not url:
            raise ValueError("run_dir: '' is not allowed; give a local path or an s3://bucket/prefix URL")
        self.url = url.rstrip("/")
        self.is_s3 = storage.is_s3(self.url)
        if "://" in self.url and not self.is_s3:
            raise ValueError(f"run_dir: {url!r} is not allowed; use a local path or s3://bucket/prefix")

    # -- naming ---------------------------------------------------------------------------------
    def join(self, rel: str) -> str:
        return f"{self.url}/{rel}" if rel else self.url

    def local_path(self, rel: str = "") -> Path:
        if self.is_s3:
            raise ValueError(f"run_dir: {self.url!r} is not a local path")
        return Path(self.url) / rel if rel else Path(self.url)

    def staging_dir(self, under: str, prefix: str) -> Path:
        """A new private local folder for files that will be stored under ``under``: inside
        ``<under>/.staging`` of a local run dir (same filesystem, so they move into place by rename),
        a temporary folder for an s3:// run dir."""
        if self.is_s3:
            return Path(tempfile.mkdtemp(prefix=f"{prefix}staging-"))
        root = self.local_path(f"{under}/.staging")
        root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=prefix, dir=root))

    # -- operations -----------------------------------------------------------------------------
    def write_bytes(self, rel: str, data: bytes) -> None:
        """Atomic: a reader sees the old file or the whole new one."""
        storage.write_bytes(self.join(rel), data)

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode())

    def read_bytes(self, rel: str) -> bytes:
        return storage.read_bytes(self.join(rel))

    def exists(self, rel: str) -> bool:
        return storage.exists(self.join(rel))

    def list_dirs(self, rel: str) -> list[str]:
        """Names of the immediate sub-folders of ``rel`` (empty when it does not exist)."""
        return storage.list_subdirs(self.join(rel))

    def put_file(self, local: str | os.PathLike, rel: str, move: bool = False) -> None:
        """Store a local file at ``rel`` (moved, not copied, when ``move``)."""
        if move:
            storage.move_file(local, self.join(rel))
        else:
            storage.upload_file(local, self.join(rel))

    def get_file(self, rel: str, local: str | os.PathLike) -> None:
        storage.download_file(self.join(rel), local)

    def sha256(self, rel: str) -> str:
        return storage.sha256(self.join(rel))

    def delete_tree(self, rel: str) -> None:
        storage.delete_prefix(self.join(rel))
