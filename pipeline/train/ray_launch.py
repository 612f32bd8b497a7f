"""Ray Train wiring: start or join Ray, run :func:`pipeline.train.loop.train` on N workers.

* No address (no ``--address``, ``train.ray_address`` or ``RAY_ADDRESS``): Ray starts in this
  process, dashboard off unless asked, with at least the logical CPUs the workers need (so a
  small machine never waits for resources that cannot come). Every Ray socket listens on
  127.0.0.1 only: on Linux Ray resolves a loopback ``node_ip_address`` to the routable address
  unless ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (single-node mode), which :func:`init_ray` sets
  for the embedded Ray and its processes.
* With an address (a cluster, ``ray job submit``, ``ray submit``): joins it.

Workers get ``TorchConfig(backend='gloo' | 'nccl', timeout_s=train.collective_timeout_s)``; DeepSpeed
runs on that process group. ``FailureConfig(max_failures=train.max_failures)`` restarts a failed
worker group, which resumes from the newest committed checkpoint in the run directory.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from pipeline.config import ExperimentConfig

__all__ = ["absolute_paths", "check_launch", "init_ray", "run_training", "worker_env"]

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
    runtime_env = {"env_vars": worker_env(cfg)}
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
        return
    _single_node_loopback()
    need = cfg.train.num_workers * cfg.train.cpus_per_worker
    if not dashboard:
        # Ray Train's placement-group cleaner polls the state API, which lives in the dashboard.
        runtime_env["worker_process_setup_hook"] = _quiet_state_api_warnings
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


def _train_worker(config: dict[str, Any]) -> None:
    """Body of each Ray Train worker: validate the config, train, report the summary."""
    import ray.train
    import torch

    from pipeline.train.loop import train

    cfg = ExperimentConfig.model_validate(config["experiment"])
    torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
    summary = train(cfg)
    ray.train.report({k: v for k, v in summary.items() if isinstance(v, (int, float))})


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
    """Fail before Ray starts on what is certainly wrong: the run dir's scheme, local data without
    a prepared manifest."""
    from pipeline.train.rundir import RunDir

    RunDir(cfg.train.run_dir)
    url = cfg.data.url
    if "://" not in url and not (Path(url).expanduser() / "dataset.json").is_file():
        raise ValueError(f"data.url: {url!r} holds no dataset.json; prepare the data first, e.g. "
                         f"python launch/prepare_data.py --source builtin:shapes10 --out {url}")
    from pipeline.train.init import check_init_from

    check_init_from(cfg)  # train.init_from loads and fits the configured network


def run_training(cfg: ExperimentConfig, address: str | None = None, dashboard: bool = False) -> dict[str, Any]:
    """Train ``cfg`` with Ray Train's TorchTrainer; returns images seen, step and the final checkpoint."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

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
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo", timeout_s=int(tc.collective_timeout_s)),
        run_config=RunConfig(name=cfg.name or "train", storage_path=storage,
                             failure_config=FailureConfig(max_failures=tc.max_failures)),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    from pipeline.train.checkpoint import committed_checkpoints

    done = committed_checkpoints(tc.run_dir)
    if not done:
        return {}
    last = done[-1]
    return {"images_seen": last.images_seen, "step": last.manifest["step"],
            "checkpoint": f"{tc.run_dir.rstrip('/')}/{last.rel}"}
