"""The README's "Scaling out" commands against a real Ray head on loopback.

`ray start --head` bound to 127.0.0.1, then `ray job submit -- python launch/train.py ...` with a
tiny override; the job must finish and its committed checkpoint must appear. The same for an
evaluation job. The head runs with its own temp dir (so in-process Ray elsewhere never joins it)
and in its own process group, which teardown kills.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Ray's token authentication stays on: the head and every client share one random token.
_TOKEN = secrets.token_hex(16)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_AUTH_TOKEN"] = _TOKEN
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    # Ray rewrites --node-ip-address=127.0.0.1 to the machine's address unless told that this is a
    # single-node cluster; with this every service of the head binds to loopback.
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.fixture(scope="module")
def ray_head():
    temp_dir = tempfile.mkdtemp(prefix="rayjob", dir="/tmp")
    port, dash, agent = _free_port(), _free_port(), _free_port()
    cmd = [
        str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true",
        f"--dashboard-agent-listen-port={agent}", "--num-cpus=2", f"--temp-dir={temp_dir}", "--disable-usage-stats",
    ]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    deadline = time.monotonic() + 180
    while True:
        # Ready means a job can be submitted: the dashboard's job agent starts after the head.
        probe = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", address, "--", "true"],
                               env=_env(), capture_output=True, text=True, timeout=120)
        if probe.returncode == 0:
            break
        if proc.poll() is not None or time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"ray head did not come up on {address}: {probe.stderr[-2000:]}")
        time.sleep(1)
    try:
        yield address
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _submit(address: str, *argv: str, timeout: float = 420) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "ray"), "job", "submit", "--address", address, "--", str(BIN / "python"), *argv]
    return subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from pipeline.data.prepare import prepare_dataset

    out = tmp_path_factory.mktemp("jobdata") / "shapes"
    prepare_dataset("builtin:shapes10", str(out), shard_size=16, num_samples=64, workers=0)
    return out


@pytest.fixture(scope="module")
def job_run(ray_head, tiny_data, tmp_path_factory):
    """`ray job submit -- python launch/train.py ...` against the head: the run directory."""
    run = tmp_path_factory.mktemp("jobrun") / "run"
    proc = _submit(
        ray_head, str(ROOT / "launch" / "train.py"), "--config", str(ROOT / "configs" / "quickstart.yaml"),
        f"train.run_dir={run}", f"data.url={tiny_data}", "train.total_images=128", "train.micro_batch=16",
        "train.checkpoint_every_images=64", "train.sample_every_images=0", "train.warmup_images=0",
        "train.precision=fp32", "data.resolution=16",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "succeeded" in (proc.stdout + proc.stderr).lower()
    return run


def test_ray_job_submit_trains_and_commits_a_checkpoint(job_run):
    manifests = sorted(job_run.glob("checkpoints/*/manifest.json"))
    assert manifests, f"no committed checkpoint under {job_run}/checkpoints"
    last = json.loads(manifests[-1].read_text())
    assert last["images_seen"] == 128
    config_text = (job_run / "config.yaml").read_text()
    assert "aws_secret_access_key" not in config_text.lower()


def test_scheduled_evaluation_job_evaluates_each_committed_checkpoint(ray_head, job_run):
    """The scheduled-evaluation entry point (`--watch --once`) as a Ray job beside training."""
    proc = _submit(
        ray_head, str(ROOT / "launch" / "evaluate.py"), "--run", str(job_run), "--watch", "--once",
        "--num-samples", "16", "--steps", "5", "--workers", "1", "--feature-extractor", "inception-v3-tf-torchscript",
        "--metrics", "fid,kid", "eval.samples_per_shard=8", "eval.kid_subset_size=8", "eval.kid_subsets=2",
        "eval.reference_max_images=32",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    committed = {p.parent.name for p in job_run.glob("checkpoints/*/manifest.json")}
    evaluated = {p.relative_to(job_run / "eval").parts[0] for p in job_run.glob("eval/*/*/metrics.json")}
    assert committed and evaluated == committed, (committed, evaluated)
    for path in job_run.glob("eval/*/*/metrics.json"):
        metrics = json.loads(path.read_text())
        assert metrics["metrics"]["fid"] >= 0, metrics


def test_ray_head_listens_on_loopback_only(ray_head):
    import psutil

    head_pids = {p.pid for p in psutil.process_iter(["cmdline"])
                 if any(ray_head.rsplit(":", 1)[1] in part for part in (p.info["cmdline"] or []))}
    assert head_pids, "could not find the head's processes"
    group = {os.getpgid(pid) for pid in head_pids}
    pids = {p.pid for p in psutil.process_iter() if _pgid(p.pid) in group}
    listening = [c for c in psutil.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN and c.pid in pids]
    assert listening, "the head has no listening sockets?"
    exposed = sorted({(c.laddr.ip, c.laddr.port) for c in listening if not _is_loopback(c.laddr.ip)})
    assert not exposed, f"Ray head listens beyond loopback: {exposed}"


def _is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None
