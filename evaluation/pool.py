"""A Ray actor pool that maps work items over long-lived workers, with a progress bar.

Workers are kept between calls (per resource shape) so that a watcher evaluating checkpoint
after checkpoint, or one evaluation going from sampling to features to bits/dim, starts its
processes once. Each worker builds its state with ``setup()`` (load a checkpoint, build an
extractor) once per distinct ``setup`` and keeps the two most recent; ``task(state, item)``
runs the items it is handed. Results come back in completion order with their item. Every wait
on a worker has a timeout; after any failure the workers are discarded.

Ray starts in-process when nothing is running, as training starts it (loopback only, no
dashboard); ``RAY_ADDRESS`` or ``ray_address`` attach to a cluster instead.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import ray
from ray import cloudpickle
from ray.util import ActorPool
from tqdm.auto import tqdm

__all__ = ["ensure_ray", "run_on_pool", "shutdown_pool"]

S = TypeVar("S")
T = TypeVar("T")
R = TypeVar("R")

_STATES_KEPT = 2


def ensure_ray(address: str | None = None) -> None:
    """Connect to ``address`` / ``RAY_ADDRESS``, or start a local Ray once per process.

    The same start-up as training (``pipeline.train.ray_launch.init_ray``): loopback only, no
    dashboard, the worker environment (DeepSpeed/AWS variables) propagated.
    """
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from pipeline.config import ExperimentConfig
    from pipeline.train.ray_launch import init_ray

    init_ray(ExperimentConfig(), address=address)


@ray.remote
class _PoolWorker:
    def __init__(self, threads: int) -> None:
        import torch

        torch.set_num_threads(max(1, threads))
        self._states: OrderedDict[str, Any] = OrderedDict()

    def run(self, key: str, setup: Callable[[], Any], task: Callable[[Any, Any], Any], pair: tuple[int, Any]):
        if key not in self._states:
            while len(self._states) >= _STATES_KEPT:
                self._states.popitem(last=False)
            self._states[key] = setup()
        self._states.move_to_end(key)
        return pair[0], task(self._states[key], pair[1])


# (num_cpus, num_gpus) -> (ray session id, actor handles)
_POOLS: dict[tuple[float, float], tuple[str, list[Any]]] = {}


def _session() -> str:
    """Identifies one Ray connection: a restarted local Ray has a new GCS address and node."""
    context = ray.get_runtime_context()
    return f"{context.gcs_address}/{context.get_node_id()}/{context.get_job_id()}"


def _workers(count: int, cpus: float, gpus: float) -> list[Any]:
    key = (float(cpus), float(gpus))
    session, actors = _POOLS.get(key, ("", []))
    if session != _session():
        actors = []
    options: dict[str, Any] = {"num_cpus": cpus}
    if gpus:
        options["num_gpus"] = gpus
    while len(actors) < count:
        actors.append(_PoolWorker.options(**options).remote(max(1, int(cpus))))
    _POOLS[key] = (_session(), actors)
    return actors[:count]


def shutdown_pool() -> None:
    """End every kept worker (they also end with ``ray.shutdown()``)."""
    for _, actors in _POOLS.values():
        for actor in actors:
            ray.kill(actor)
    _POOLS.clear()


def run_on_pool(
    setup: Callable[[], S],
    task: Callable[[S, T], R],
    items: Sequence[T],
    num_workers: int = 1,
    cpus_per_worker: float = 1.0,
    gpus_per_worker: float = 0.0,
    timeout_s: float = 3600.0,
    progress: str | None = None,
    units: Callable[[T], int] = lambda item: 1,
    ray_address: str | None = None,
) -> Iterator[tuple[T, R]]:
    """Yield ``(item, task(state, item))`` for every item, computed on ``num_workers`` workers.

    ``setup`` and ``task`` are pickled to the workers (module-level functions, partials or
    frozen dataclasses). ``timeout_s`` bounds the wait for each single result.
    """
    if num_workers < 1:
        raise ValueError(f"num_workers: {num_workers!r} is not allowed; it must be >= 1")
    items = list(items)
    if not items:
        return
    ensure_ray(ray_address)
    key = hashlib.sha256(cloudpickle.dumps(setup)).hexdigest()
    actors = _workers(min(num_workers, len(items)), cpus_per_worker, gpus_per_worker)
    bar = tqdm(total=sum(units(i) for i in items), desc=progress, unit="img", disable=progress is None)
    pool = ActorPool(actors)
    setup_ref = ray.put(setup)
    try:
        for index, item in enumerate(items):
            pool.submit(lambda actor, pair: actor.run.remote(key, setup_ref, task, pair), (index, item))
        while pool.has_next():
            try:
                index, result = pool.get_next_unordered(timeout=timeout_s)
            except TimeoutError:
                raise TimeoutError(f"an evaluation worker gave no result within timeout_s={timeout_s}") from None
            bar.update(units(items[index]))
            yield items[index], result
    except BaseException:
        shutdown_pool()  # unfinished tasks must not run on into the next call
        raise
    finally:
        bar.close()
