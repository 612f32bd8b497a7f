"""The driver's preemption signal handling, without Ray: a process holding
:class:`pipeline.train.preemption.SignalHandler` (as ``run_training`` does around ``trainer.fit()``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.train import preemption

ROOT = Path(__file__).resolve().parents[1]

DRIVER = """
import signal, sys, time
from pipeline.train.preemption import SignalHandler
run, sleep_s, grace_s = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
with SignalHandler(run, grace_s) as h:
    print("ready", flush=True)
    deadline = time.monotonic() + sleep_s
    while time.monotonic() < deadline:  # stands for trainer.fit(): a worker would see <run>/PREEMPT
        time.sleep(0.01)
print("handlers restored:", signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, "signal:", h.signum, flush=True)
"""


def _driver(run: Path, sleep_s: float, grace_s: float, log: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(run), str(sleep_s), str(grace_s)], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=open(log, "w"),  # noqa: SIM115
                            stderr=subprocess.STDOUT)
    _wait(lambda: "ready" in log.read_text(), proc)
    return proc


def _wait(cond, proc: subprocess.Popen, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.005)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_first_signal_requests_a_checkpoint_and_the_run_continues(tmp_path, sig):
    run, log = tmp_path / "run", tmp_path / "log"
    (run).mkdir()
    (run / preemption.MARKER).write_text("stale\n")  # left by an earlier run: cleared on entry
    proc = _driver(run, 3.0, 60.0, log)
    assert not (run / preemption.MARKER).exists()
    proc.send_signal(sig)
    _wait(lambda: (run / preemption.MARKER).exists(), proc, timeout_s=10)  # what the workers poll
    assert proc.wait(timeout=30) == 0
    out = log.read_text()
    assert f"{signal.Signals(sig).name} received" in out and f"handlers restored: True signal: {int(sig)}" in out
    assert not (run / preemption.MARKER).exists()  # cleared once the run has stopped


def test_second_signal_stops_at_once(tmp_path):
    run, log = tmp_path / "run", tmp_path / "log"
    proc = _driver(run, 60.0, 60.0, log)
    proc.send_signal(signal.SIGTERM)
    _wait(lambda: "SIGTERM received" in log.read_text(), proc, timeout_s=10)  # merged if still pending
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 128 + signal.SIGINT
    assert "second SIGINT: stopping now" in log.read_text()


def test_grace_period_running_out_stops_the_driver(tmp_path):
    run, log = tmp_path / "run", tmp_path / "log"
    proc = _driver(run, 60.0, 1.0, log)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    assert time.monotonic() - sent >= 1.0
    assert "no checkpoint within train.preemption_grace_s=1 s" in log.read_text()


def test_requested_polls_the_marker_in_a_single_process(tmp_path):
    run = str(tmp_path / "run")
    assert preemption.requested(run) is False
    preemption.request(run)
    assert preemption.requested(run) is True
    preemption.clear(run)
    assert preemption.requested(run) is False
    preemption.clear(run)  # clearing twice is fine


def test_requested_reads_an_s3_marker(s3_bucket):
    run = f"{s3_bucket}/run"
    assert preemption.requested(run) is False
    preemption.request(run)
    time.sleep(preemption.S3_POLL_INTERVAL_S)  # S3 is polled at most once per interval
    assert preemption.requested(run) is True
    preemption.clear(run)
    time.sleep(preemption.S3_POLL_INTERVAL_S)
    assert preemption.requested(run) is False
