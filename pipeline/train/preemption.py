"""Preemption: SIGTERM / SIGINT to the driver become a committed checkpoint and a clean exit.

Driver side (:class:`SignalHandler`, around ``trainer.fit()``): the first SIGTERM or SIGINT writes
the marker ``<run>/PREEMPT`` and starts a timer of ``train.preemption_grace_s``. Workers see the
marker at the next step boundary (:func:`requested`), write and commit a checkpoint, and return;
the driver exits with :data:`EXIT_PREEMPTED`. A second signal, or the grace period running out,
ends the driver at once with ``128 + signal`` (143 for SIGTERM, 130 for SIGINT); a checkpoint
being written then has no manifest and is ignored, so the previous committed one stays the resume
point (a checkpoint is committed only by its manifest, written last).

Worker side (:func:`requested`, a collective at the step boundary): rank 0 looks for the marker
(a ``stat`` locally, a HEAD on S3 at most every :data:`S3_POLL_INTERVAL_S`), and one 1-element
all-reduce makes every rank take the same decision, so collectives stay in lockstep.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import torch

from pipeline.train import dist
from pipeline.train.rundir import RunDir

__all__ = ["EXIT_PREEMPTED", "MARKER", "Preempted", "SignalHandler", "clear", "request", "requested"]

MARKER = "PREEMPT"
# Exit status of a run stopped by SIGTERM/SIGINT after committing its checkpoint: EX_TEMPFAIL
# ("temporary failure; the user is invited to retry"): run the same command again to resume.
EXIT_PREEMPTED = 75
S3_POLL_INTERVAL_S = 1.0


class Preempted(Exception):
    """Raised on every rank after the preemption checkpoint at ``images_seen`` is committed."""

    def __init__(self, images_seen: int):
        super().__init__(f"preempted at {images_seen} images (checkpoint committed)")
        self.images_seen = images_seen


def request(run_dir: str) -> None:
    """Ask the workers of the run in ``run_dir`` to checkpoint and stop at the next step."""
    RunDir(run_dir).write_text(MARKER, f"{time.time()}\n")


def clear(run_dir: str) -> None:
    run = RunDir(run_dir)
    if run.is_s3:
        from pipeline.data import storage

        storage.delete_prefix(run.join(MARKER))  # the one key <run>/PREEMPT
    else:
        run.local_path(MARKER).unlink(missing_ok=True)


_last_poll = {"t": -float("inf"), "seen": False}


def _marker_seen(run_dir: str) -> bool:
    run = RunDir(run_dir)
    now = time.monotonic()
    if not run.is_s3 or now - _last_poll["t"] >= S3_POLL_INTERVAL_S:
        _last_poll["t"], _last_poll["seen"] = now, run.exists(MARKER)
    return bool(_last_poll["seen"])


def requested(run_dir: str) -> bool:
    """Collective: True on every rank once the driver asked the run to stop."""
    seen = 1.0 if dist.is_main() and _marker_seen(run_dir) else 0.0
    return bool(dist.all_reduce_max(torch.tensor([seen])).item() > 0)


class SignalHandler:
    """Context manager for the driver: SIGTERM/SIGINT -> :func:`request`, grace timer, hard stop.

    ``signum`` is the first signal received (None if none). Handlers are restored on exit. Only
    installed in the main thread (Python delivers signals there); elsewhere it does nothing.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, run_dir: str, grace_s: float):
        self.run_dir, self.grace_s = run_dir, grace_s
        self.signum: int | None = None
        self._previous: dict[int, object] = {}
        self._timer: threading.Timer | None = None

    def __enter__(self) -> SignalHandler:
        clear(self.run_dir)  # a marker left by an earlier run must not stop this one
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if self.signum is not None:
            clear(self.run_dir)

    def _on_signal(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None:
            self._stop_now(f"second {name}: stopping now; the newest committed checkpoint is the resume point",
                           signum)
        self.signum = signum
        print(f"{name} received: checkpointing at the next step boundary (grace {self.grace_s:g} s); "
              f"send it again to stop at once", file=sys.stderr, flush=True)
        request(self.run_dir)
        self._timer = threading.Timer(self.grace_s, self._stop_now,
                                      args=(f"no checkpoint within train.preemption_grace_s={self.grace_s:g} s; "
                                            "stopping; the newest committed checkpoint is the resume point", signum))
        self._timer.daemon = True
        self._timer.start()

    @staticmethod
    def _stop_now(message: str, signum: int) -> None:
        print(message, file=sys.stderr, flush=True)
        # Ray's processes of an embedded run die with the driver (Ray's reaper watches it).
        os._exit(128 + signum)
