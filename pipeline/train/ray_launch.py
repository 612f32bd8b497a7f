"""Ray Train wiring: start or join Ray, run :func:`pipeline.train.loop.train` on N workers.

* No address (no ``--address``, ``train.ray_address`` or ``RAY_ADDRESS``): Ray starts in this
  process, dashboard off unless asked, with at least the logical CPUs the workers need (so a
  small machine never waits for resources that cannot come). Every Ray socket listens on
  127.0.0.1 only: on Linux Ray resolves a loopback ``node_ip_address`` to the routable address
  unless ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (single-node mode), which :func:`init_ray` sets
  for the embedded Ray and its processes.
* With an address (a cluster, ``ray job submit``, ``ray submit``): joins it.

Workers get :func:`torch_config` (Ray Train's ``TorchConfig(backend='gloo' | 'nccl',
timeout_s=train.collective_timeout_s)`` plus where the rendezvous listens); DeepSpeed runs on that
process group. ``FailureConfig(max_failures=train.max_failures)`` restarts a failed worker group,
which resumes from the newest committed checkpoint in the run directory.

Network exposure of the process group. Ray Train's default rendezvous, torch's TCPStore on rank
0, listens on every interface. Here rank 0 opens the store's listening socket itself, bound to the
Ray node address, and hands it to the store (``master_listen_fd``); gloo's and NCCL's bootstrap
sockets bind to the interface that holds that address (``GLOO_SOCKET_IFNAME`` /
``NCCL_SOCKET_IFNAME``). So the embedded default listens on 127.0.0.1 only, and a cluster on each
node's cluster address only.

Errors inside a worker reach the caller as one :class:`TrainingFailed` whose message is the root
cause's last line (the full tracebacks stay in Ray's worker logs).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import ExperimentConfig

__all__ = ["TrainingFailed", "absolute_paths", "check_launch", "init_ray", "run_training", "torch_config",
           "worker_env"]


class TrainingFailed(RuntimeError):
    """Training failed inside Ray; the message is one line naming the root cause."""

# Environment every worker needs: the CPU accelerator for DeepSpeed when there is no GPU, a
# persistent torch-extensions cache, no usage reporting.
_PROPAGATED = ("DS_ACCELERATOR", "DS_BUILD_OPS", "TORCH_EXTENSIONS_DIR", "RAY_USAGE_STATS_ENABLED",
               "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION")


def worker_env(cfg: ExperimentConfig) -> dict[str, str]:
    env = {k: os.environ[k] for k in _PROPAGATED if k in os.environ}
    if cfg.train.gpus_per_worker == 0:
        env["DS_ACCELERATOR"] = "cpu"
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not (cfg.train.ray_address or os.environ.get("RAY_ADDRESS")):
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    env["OMP_NUM_THREADS"] = str(max(1, int(cfg.train.cpus_per_worker)))
    return env


def init_ray(cfg: ExperimentConfig, address: str | None = None, dashboard: bool = False) -> None:
    """Join ``address`` (or ``train.ray_address`` / ``RAY_ADDRESS``), else start Ray on 127.0.0.1."""
    import ray

    if ray.is_initialized():
        return
    address = address or cfg.train.ray_address or os.environ.get("RAY_ADDRESS")
    runtime_env = {"env_vars": worker_env(cfg), "worker_process_setup_hook": _one_line_train_errors}
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
        return
    _single_node_loopback()
    need = cfg.train.num_workers * cfg.train.cpus_per_worker
    if not dashboard:
        # Ray Train's placement-group cleaner polls the state API, which lives in the dashboard.
        runtime_env["worker_process_setup_hook"] = _quiet_and_one_line
    ray.init(
        num_cpus=max(os.cpu_count() or 1, math.ceil(need) + 1),  # + 1: Ray Train's own actors
        _node_ip_address="127.0.0.1",
        include_dashboard=dashboard,
        dashboard_host="127.0.0.1",
        runtime_env=runtime_env,
        log_to_driver=True,
        configure_logging=False,
    )


def _single_node_loopback() -> None:
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray._private import ray_constants

    # The constant is read once when ray is imported; an earlier import in this process read it
    # before the variable was set.
    ray_constants.ENABLE_RAY_CLUSTER = False


def _quiet_state_api_warnings() -> None:
    import logging

    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)


# Ray Train loggers that print a worker's full traceback (the worker itself, then the controller's
# failure policy); the driver prints the root cause as one line and stores the full text in
# <run>/logs/error.log instead.
_TRACEBACK_LOGGERS = ("ray.train.v2._internal.util", "ray.train.v2._internal.execution.failure_handling.default")


def _one_line_train_errors() -> None:
    import logging

    class OneLine(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            text = record.getMessage()
            if record.exc_info or "\n" in text:
                lines = [line.strip() for line in text.splitlines() if line.strip()]
                head, tail = (lines[0], lines[-1]) if lines else ("", "")
                record.msg = head if head == tail else f"{head} {tail}"
                record.args, record.exc_info, record.exc_text = (), None, None
            return True

    for name in _TRACEBACK_LOGGERS:
        logging.getLogger(name).addFilter(OneLine())


def _quiet_and_one_line() -> None:
    _quiet_state_api_warnings()
    _one_line_train_errors()


def _train_worker(config: dict[str, Any]) -> None:
    """Body of each Ray Train worker: validate the config, train, report the summary.

    A preemption request ends the loop after a committed checkpoint; the worker then returns
    normally (so ``FailureConfig`` does not restart it) and reports ``preempted=1``."""
    import ray.train
    import torch

    from pipeline.train.loop import train
    from pipeline.train.preemption import Preempted

    cfg = ExperimentConfig.model_validate(config["experiment"])
    torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
    try:
        summary = train(cfg)
    except Preempted as stop:
        summary = {"images_seen": stop.images_seen, "preempted": 1}
    ray.train.report({k: v for k, v in summary.items() if isinstance(v, (int, float))})


# ---------------------------------------------------------------------------------------------
# Process group: where its rendezvous and its sockets listen


def _interface_of(address: str) -> str | None:
    """The network interface that holds ``address`` (e.g. 'lo' for 127.0.0.1), or None."""
    import ipaddress
    import socket

    import psutil

    want = ipaddress.ip_address(address)
    for name, addrs in psutil.net_if_addrs().items():
        for a in addrs:
            if a.family in (socket.AF_INET, socket.AF_INET6):
                try:
                    if ipaddress.ip_address(a.address.split("%")[0]) == want:
                        return name
                except ValueError:
                    continue
    return None


def _bind_to_node_address() -> None:
    """On a worker, before the process group exists: gloo / NCCL sockets on the Ray node address's
    interface only (loopback in the embedded default)."""
    import ray

    iface = _interface_of(ray.util.get_node_ip_address())
    if iface is not None:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", iface)
        os.environ.setdefault("NCCL_SOCKET_IFNAME", iface)


# Rank 0 keeps the store's listening socket for the life of its process group.
_STORE_SOCKET: Any = None


def _init_process_group(backend: str, world_rank: int, world_size: int, addr: str, port: int, timeout_s: float) -> None:
    """On a worker: the default process group, its TCPStore listening on ``addr`` only.

    torch's TCPStore listens on every interface when it opens its own socket; given an already
    listening socket (``master_listen_fd``) it serves on that one, bound here to the node address."""
    import datetime
    import socket

    import torch.distributed as torch_dist

    global _STORE_SOCKET
    # DeepSpeed's CPU shared-memory all-reduce names its segments after MASTER_ADDR/MASTER_PORT.
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = addr, str(port)
    if backend == "nccl":
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # fail, not hang, on a timeout
    timeout = datetime.timedelta(seconds=timeout_s)
    if world_rank == 0:
        sock = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((addr, port))
        sock.listen(max(128, world_size))
        _STORE_SOCKET = sock
        store = torch_dist.TCPStore(addr, port, world_size, True, timeout, wait_for_workers=False,
                                    master_listen_fd=sock.fileno())
    else:
        store = torch_dist.TCPStore(addr, port, world_size, False, timeout)  # retries until rank 0 listens
    torch_dist.init_process_group(backend, store=store, rank=world_rank, world_size=world_size, timeout=timeout)


def _torch_backend_cls():
    from ray.train._internal.utils import get_address_and_port
    from ray.train._internal.worker_group import WorkerGroup as V1WorkerGroup
    from ray.train.torch.config import _set_torch_distributed_env_vars, _TorchBackend

    class _NodeAddressTorchBackend(_TorchBackend):
        """Ray Train's torch backend with a process group that listens on the node address only."""

        def on_start(self, worker_group, backend_config) -> None:
            import ray

            worker_group.execute(_bind_to_node_address)
            backend = backend_config.backend or "gloo"
            addr, port = worker_group.execute_single(0, get_address_and_port)  # Ray's node address, a free port
            if not isinstance(worker_group, V1WorkerGroup):
                worker_group.execute(_set_torch_distributed_env_vars)
            n = len(worker_group)
            ray.get([worker_group.execute_single_async(i, _init_process_group, backend=backend, world_rank=i,
                                                       world_size=n,
                                                       addr=addr, port=port, timeout_s=backend_config.timeout_s)
                     for i in range(n)])

    return _NodeAddressTorchBackend


def torch_config(backend: str, timeout_s: int):
    """Ray Train's ``TorchConfig(backend, timeout_s)`` whose process group listens on the Ray node
    address only: its TCPStore and gloo/NCCL sockets (127.0.0.1 in the embedded default)."""
    from ray.train.torch import TorchConfig

    @dataclass
    class _NodeAddressTorchConfig(TorchConfig):
        @property
        def backend_cls(self):
            return _torch_backend_cls()

    return _NodeAddressTorchConfig(backend=backend, timeout_s=timeout_s)


def _one_line(exc: BaseException) -> str:
    """The last line of the root cause of a Ray Train failure (its worker's exception)."""
    causes: list[BaseException] = []
    failures = getattr(exc, "worker_failures", None)
    if failures:
        causes.append(failures[min(failures)])
    controller = getattr(exc, "controller_failure", None)
    if controller is not None:
        causes.append(controller)
    root = causes[0] if causes else exc
    while getattr(root, "cause", None) is not None and isinstance(root.cause, BaseException):
        root = root.cause  # RayTaskError -> the user's exception
    lines = [line.strip() for line in str(root).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(root).__name__


def absolute_paths(cfg: ExperimentConfig) -> ExperimentConfig:
    """Local ``data.url`` and ``train.run_dir`` made absolute: Ray workers run in another folder."""

    def fix(url: str) -> str:
        return url if "://" in url else str(Path(url).expanduser().resolve())

    init = cfg.train.init_from
    init = init.model_copy(update={"path": fix(init.path)}) if init is not None else None  # train.init_from
    return cfg.model_copy(update={"data": cfg.data.model_copy(update={"url": fix(cfg.data.url)}),
                                  "train": cfg.train.model_copy(update={"run_dir": fix(cfg.train.run_dir),
                                                                        "init_from": init})})


def check_launch(cfg: ExperimentConfig) -> None:
    """Fail before Ray starts on what is certainly wrong (see :mod:`pipeline.train.preflight`)."""
    from pipeline.train.preflight import preflight

    preflight(cfg)
    from pipeline.train.init import check_init_from

    check_init_from(cfg)  # train.init_from loads and fits the configured network


def run_training(cfg: ExperimentConfig, address: str | None = None, dashboard: bool = False) -> dict[str, Any]:
    """Train ``cfg`` with Ray Train's TorchTrainer; returns images seen, step and the final checkpoint
    (and ``preempted: True`` when a SIGTERM/SIGINT stopped it at a committed checkpoint).

    Raises :class:`TrainingFailed` (one line) when a worker fails."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.train import preemption

    cfg = absolute_paths(cfg)
    init_ray(cfg, address, dashboard)
    tc = cfg.train
    use_gpu = tc.gpus_per_worker > 0
    resources = {"CPU": tc.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = tc.gpus_per_worker
    storage = None
    if not tc.run_dir.startswith("s3://"):
        storage = str((Path(tc.run_dir) / "ray").resolve())
    trainer = TorchTrainer(
        train_loop_per_worker=_train_worker,
        train_loop_config={"experiment": cfg.model_dump(mode="json")},
        scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        torch_config=torch_config(backend="nccl" if use_gpu else "gloo", timeout_s=int(tc.collective_timeout_s)),
        run_config=RunConfig(name=cfg.name or "train", storage_path=storage,
                             failure_config=FailureConfig(max_failures=tc.max_failures)),
    )
    with preemption.SignalHandler(tc.run_dir, tc.preemption_grace_s) as signals:
        try:
            result = trainer.fit()
        except Exception as exc:
            if _is_train_failure(exc):
                raise _failed(tc.run_dir, exc) from None
            raise
    if result.error is not None:
        raise _failed(tc.run_dir, result.error) from None
    from pipeline.train.checkpoint import committed_checkpoints

    done = committed_checkpoints(tc.run_dir)
    out: dict[str, Any] = {}
    if done:
        last = done[-1]
        out = {"images_seen": last.images_seen, "step": last.step,
               "checkpoint": f"{tc.run_dir.rstrip('/')}/{last.rel}"}
    # Preempted: a signal came and the run stopped (at its committed checkpoint) before the end.
    if signals.signum is not None and out.get("images_seen", 0) < tc.total_images:
        out["preempted"] = True
        out["signal"] = signals.signum
    return out


def _failed(run_dir: str, exc: BaseException) -> TrainingFailed:
    """One line for the user; the full text (worker tracebacks) in ``<run>/logs/error.log``."""
    import traceback

    from pipeline.train.rundir import RunDir

    line = _one_line(exc)
    try:
        parts = [str(exc)] + [f"rank {r}: {e}" for r, e in sorted((getattr(exc, "worker_failures", None) or {}).items())]
        RunDir(run_dir).write_text("logs/error.log", "\n\n".join(parts) + "\n" + "".join(traceback.format_exception(exc)))
        line += f" (full traceback: {RunDir(run_dir).join('logs/error.log')})"
    except OSError:
        pass
    return TrainingFailed(line)


def _is_train_failure(exc: BaseException) -> bool:
    from ray.train import TrainingFailedError

    return isinstance(exc, TrainingFailedError)
