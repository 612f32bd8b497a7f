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
import socket
import sys
import threading
import time

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


_last_poll: dict[str, tuple[float, bool]] = {}  # run dir -> (monotonic time of the last look, marker seen)


def _marker_seen(run_dir: str) -> bool:
    run = RunDir(run_dir)
    now = time.monotonic()
    last, seen = _last_poll.get(run_dir, (-float("inf"), False))
    if not run.is_s3 or now - last >= S3_POLL_INTERVAL_S:
        seen = run.exists(MARKER)
        _last_poll[run_dir] = (now, seen)
    return seen


def requested(run_dir: str) -> bool:
    """Collective: True on every rank once the driver asked the run to stop."""
    import torch

    from pipeline.train import dist
    seen = 1.0 if dist.is_main() and _marker_seen(run_dir) else 0.0
    return bool(dist.all_reduce_max(torch.tensor([seen])).item() > 0)


class SignalHandler:
    """Context manager for the driver: SIGTERM/SIGINT -> :func:`request`, grace timer, hard stop.

    ``signum`` is the first signal received (None if none). Python runs signal handlers only when
    the main thread next executes bytecode (it may sit in Ray's ``get`` for a while) and merges a
    repeated signal that arrives before then into one call; so every delivery is read from the
    wakeup file descriptor (one byte per signal, written by the C-level handler) by a thread, which
    counts them and acts at once. Installed only in the main thread; elsewhere it does nothing.
    Handlers and the wakeup descriptor are restored on exit.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, run_dir: str, grace_s: float):
        self.run_dir, self.grace_s = run_dir, grace_s
        self.signum: int | None = None
        self._previous: dict[int, object] = {}
        self._timer: threading.Timer | None = None
        self._pair: tuple[socket.socket, socket.socket] | None = None
        self._old_wakeup = -1

    def __enter__(self):
        clear(self.run_dir)  # a marker left by an earlier run must not stop this one
        if threading.current_thread() is threading.main_thread():
            reader, writer = socket.socketpair()
            writer.setblocking(False)
            self._pair = (reader, writer)
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, _ignore)
            self._old_wakeup = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
            threading.Thread(target=self._watch, args=(reader,), name="preemption-signals", daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._pair is not None:
            signal.set_wakeup_fd(self._old_wakeup)
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)
            self._pair[1].close()  # the watcher reads EOF and ends
        if self.signum is not None:
            clear(self.run_dir)

    def _watch(self, reader: socket.socket) -> None:
        with reader:
            while True:
                try:
                    data = reader.recv(64)
                except OSError:
                    return
                if not data:
                    return
                for signum in data:
                    if signum in self.SIGNALS:
                        self._on_signal(signum)

    def _on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None:
            self._stop_now(f"second {name}: stopping now; the newest committed checkpoint is the resume point",
                           signum)
        self.signum = signum
        print(f"{name} received: checkpointing at the next step boundary (grace {self.grace_s:g} s); "
              f"send it again to stop at once", file=sys.stderr, flush=True)
        request(self.run_dir)
        late = (f"no checkpoint within train.preemption_grace_s={self.grace_s:g} s; stopping; the newest "
                "committed checkpoint is the resume point")
        self._timer = threading.Timer(self.grace_s, self._stop_now, args=(late, signum))
        self._timer.daemon = True
        self._timer.start()

    @staticmethod
    def _stop_now(message: str, signum: int) -> None:
        print(message, file=sys.stderr, flush=True)
        # Ray's processes of an embedded run die with the driver (Ray's reaper watches it); on a
        # cluster, Ray ends the job's actors when their owner (this driver) exits.
        os._exit(128 + signum)


def _ignore(signum: int, frame) -> None:
    """The Python-level handler: the work happens in :meth:`SignalHandler._watch`."""
