"""SIGTERM to ``launch/train.py`` mid-run: the workers commit a checkpoint at the next step boundary,
the driver exits with 75; a second signal during the next preemption leaves the committed
checkpoints intact (exit 143); resuming ends bitwise equal to an undisturbed run. While the
undisturbed run trains on the embedded Ray, every listening socket of its processes (driver, Ray,
the Ray Train workers) is on loopback. Real Ray, real DeepSpeed (ZeRO-2, 2 gloo workers), bf16
end to end: training, preemption, resume, export."""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from test_train_unit import TINY, assert_same_checkpoint_tensors

from pipeline.config import load_config
from pipeline.train.checkpoint import committed_checkpoints, find_resume_checkpoint, load_ema_weights, verify_checkpoint
from pipeline.train.preemption import EXIT_PREEMPTED, MARKER
from pipeline.train.rundir import RunDir

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TOTAL, EVERY = 768, 128  # images; 2 workers x micro-batch 4 = 8 per step


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    from pipeline.data.prepare import prepare_dataset

    out = tmp_path_factory.mktemp("data") / "shapes"
    prepare_dataset("builtin:shapes10", str(out), shard_size=64, num_samples=512, workers=0, progress=False)
    return str(out)


def _args(dataset: str, run: Path) -> list[str]:
    return [*TINY, f"data.url={dataset}", f"train.run_dir={run}", "train.num_workers=2", "train.micro_batch=4",
            "train.zero_stage=2", "train.precision=bf16", f"train.checkpoint_every_images={EVERY}", f"train.total_images={TOTAL}",
            "train.keep_last=20", "train.preemption_grace_s=90"]


_started: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _reap():
    yield
    for proc in _started:  # a failed assertion must not leave a training run behind
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _start(args: list[str], log: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "launch/train.py", *args], cwd=ROOT, stdout=open(log, "w"),  # noqa: SIM115
                            stderr=subprocess.STDOUT, start_new_session=True)
    _started.append(proc)
    return proc


def _wait_for(cond, proc: subprocess.Popen, log: Path, timeout_s: float = 240.0, every_s: float = 0.02) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert proc.poll() is None, f"run ended early ({proc.returncode}):\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, log.read_text()[-4000:]
        time.sleep(every_s)


def _listening(root: psutil.Process) -> list[tuple[str, str]]:
    """(process name/cmdline head, 'ip:port') of every listening inet socket of ``root``'s tree."""
    out = []
    for p in [root, *root.children(recursive=True)]:
        try:
            label = " ".join(p.cmdline())[:60]
            out += [(label, f"{c.laddr.ip}:{c.laddr.port}") for c in p.net_connections(kind="inet")
                    if c.status == psutil.CONN_LISTEN]
        except psutil.Error:
            continue
    return out


def _is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    mapped = getattr(addr, "ipv4_mapped", None)
    return (mapped or addr).is_loopback


def _last_logged(run: Path) -> int:
    path = run / "logs" / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return json.loads(lines[-1])["images_seen"] if lines else -1


def test_sigterm_commits_a_checkpoint_and_the_resumed_run_equals_an_undisturbed_one(dataset, tmp_path):
    """One Ray, started here (embedded default, as the CLI starts it); the two interrupted runs are
    ``launch/train.py --address`` drivers joined to it, so Ray starts once."""
    import threading

    import ray

    from pipeline.train.ray_launch import init_ray, run_training

    run, baseline = tmp_path / "run", tmp_path / "baseline"
    args = _args(dataset, run)
    t0 = time.monotonic()
    init_ray(load_config(None, args))
    try:
        address = ray.get_runtime_context().gcs_address
        # 0. The undisturbed run; while it trains, list the listening sockets of this process's tree.
        done: dict = {}
        thread = threading.Thread(target=lambda: done.update(run_training(load_config(None, _args(dataset, baseline)))),
                                  daemon=True)
        thread.start()
        deadline = time.monotonic() + 240
        while not (baseline / f"checkpoints/{EVERY:012d}/manifest.json").exists():
            assert thread.is_alive() and time.monotonic() < deadline
            time.sleep(0.02)
        sockets = _listening(psutil.Process(os.getpid()))
        thread.join(timeout=300)
        assert done.get("images_seen") == TOTAL
        assert any("RayTrainWorker" in label for label, _ in sockets), sockets  # the workers were inspected
        exposed = [(label, addr) for label, addr in sockets if not _is_loopback(addr.rsplit(":", 1)[0])]
        assert not exposed, exposed
        print(f"phase 0 {time.monotonic() - t0:.1f} s; {len(sockets)} listening sockets, all on loopback")

        # 1. SIGTERM after the first periodic checkpoint: a new committed checkpoint, exit 75.
        log1 = tmp_path / "run1.log"
        proc = _start(["--address", address, *args], log1)
        # After the first periodic checkpoint and a logged step past it (a signal that lands while
        # that checkpoint is being committed is answered by it: no second write at the same step).
        _wait_for(lambda: (run / f"checkpoints/{EVERY:012d}/manifest.json").exists() and _last_logged(run) > EVERY,
                  proc, log1)
        periodic = max(c.images_seen for c in committed_checkpoints(str(run)))
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=150)
        out1 = log1.read_text()
        assert rc == EXIT_PREEMPTED, out1[-4000:]
        print(f"preempted run exited {time.monotonic() - sent:.1f} s after SIGTERM")
        assert "SIGTERM received" in out1 and "preempted: checkpoint committed" in out1
        first = committed_checkpoints(str(run))[-1]
        assert periodic < first.images_seen < TOTAL  # beyond the last periodic checkpoint
        assert verify_checkpoint(RunDir(str(run)), first) is None
        assert not (run / MARKER).exists()
        print(f"phase 1 {time.monotonic() - t0:.1f} s")

        # 2. Resume; SIGTERM, then a second SIGTERM while the preemption checkpoint is being written.
        log2 = tmp_path / "run2.log"
        proc = _start(["--address", address, *args], log2)
        _wait_for(lambda: _last_logged(run) > first.images_seen, proc, log2)
        proc.send_signal(signal.SIGTERM)
        # The kernel merges a signal into one still pending, so wait until the driver has taken the
        # first; then send the second as soon as a rank stages its files, or after 0.5 s at the
        # latest: the driver needs seconds from the first signal to a clean exit (6 s measured).
        _wait_for(lambda: "SIGTERM received" in log2.read_text(), proc, log2, timeout_s=30, every_s=0.001)
        staging = run / "checkpoints" / ".staging"
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline and not (staging.is_dir() and any(staging.iterdir())):
            time.sleep(0.0005)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=60)
        out2 = log2.read_text()
        assert rc == 128 + signal.SIGTERM, out2[-4000:]
        assert "second SIGTERM" in out2
        for ckpt in committed_checkpoints(str(run)):  # every committed checkpoint is whole
            assert verify_checkpoint(RunDir(str(run)), ckpt) is None, ckpt.rel
        resume_from = find_resume_checkpoint(str(run))
        assert resume_from is not None and resume_from.images_seen >= first.images_seen
        print(f"phase 2 {time.monotonic() - t0:.1f} s")

        # 3. Resume to the end.
        assert run_training(load_config(None, args))["images_seen"] == TOTAL
        print(f"phase 3 {time.monotonic() - t0:.1f} s")
    finally:
        ray.shutdown()
    name = f"checkpoints/{TOTAL:012d}"
    assert assert_same_checkpoint_tensors(run / name, baseline / name) == 0.0  # weights, Adam moments: bitwise
    for rate in (0.9, 0.99):
        ea, _ = load_ema_weights(str(run), rate=rate)
        eb, _ = load_ema_weights(str(baseline), rate=rate)
        assert all(ea[k].equal(eb[k]) for k in ea)

    # bf16 export of the resumed run loads without DeepSpeed/Ray and holds the checkpoint's fp32 EMA.
    from pipeline.export import export_run
    from pipeline.pretrained import load_pretrained

    export_run(str(run), str(tmp_path / "export"), ema_rate=0.99)
    model, _ = load_pretrained(tmp_path / "export")
    ema, _ = load_ema_weights(str(run), rate=0.99)
    exported = model.state_dict()
    assert exported and all(v.equal(ema[f"net.{k}"]) for k, v in exported.items() if f"net.{k}" in ema)
    assert sum(f"net.{k}" in ema for k in exported) == len(dict(model.named_parameters()))
