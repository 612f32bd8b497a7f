"""Training under real Ray Train + DeepSpeed with 2 gloo workers: exact resume (ZeRO-2, ZeRO-3)
and fault tolerance (a worker killed with SIGKILL mid-run).

One in-process Ray (127.0.0.1, no dashboard) serves the whole module; models have ~11k parameters.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
from test_train_unit import TINY, assert_same_checkpoint_tensors

from pipeline.config import load_config
from pipeline.train.checkpoint import committed_checkpoints, load_ema_weights
from pipeline.train.ray_launch import init_ray, run_training

pytestmark = pytest.mark.slow

TOTAL = 64  # images; 2 workers x micro-batch 4 = 8 per step -> 8 steps


def _cfg(dataset: str, run: Path, *extra: str):
    return load_config(None, [*TINY, f"data.url={dataset}", f"train.run_dir={run}", "train.num_workers=2",
                              "train.micro_batch=4", "train.checkpoint_every_images=16",
                              f"train.total_images={TOTAL}", "train.keep_last=10", "train.sample_every_images=32",
                              *extra])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    from pipeline.data.prepare import prepare_dataset

    out = tmp_path_factory.mktemp("data") / "shapes"
    prepare_dataset("builtin:shapes10", str(out), shard_size=64, num_samples=512, workers=0, progress=False)
    return str(out)


@pytest.fixture(scope="module")
def ray_session(dataset, tmp_path_factory):
    import ray

    init_ray(_cfg(dataset, tmp_path_factory.mktemp("unused")))
    assert ray.util.get_node_ip_address() == "127.0.0.1"
    yield
    ray.shutdown()


def _losses(run: Path) -> dict[int, float]:
    out = {}
    for line in (run / "logs" / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["images_seen"]] = rec["loss"]  # a replayed step after a restart overwrites its first record
    return out


def _assert_same_run(a: Path, b: Path) -> dict[str, float]:
    """Same logged losses, and the final checkpoints' tensors (weights, Adam moments) and EMAs
    within 1e-6. Returns the max abs differences (0.0 = bitwise)."""
    la, lb = _losses(a), _losses(b)
    assert la.keys() == lb.keys()
    loss_diff = max(abs(la[k] - lb[k]) for k in la)
    assert loss_diff <= 1e-6, (la, lb)
    name = f"checkpoints/{TOTAL:012d}"
    diff = assert_same_checkpoint_tensors(a / name, b / name)
    assert diff <= 1e-6, diff
    ema_diff = 0.0
    for rate in (0.9, 0.99):
        ea, _ = load_ema_weights(str(a), rate=rate)
        eb, _ = load_ema_weights(str(b), rate=rate)
        ema_diff = max(ema_diff, max((ea[k] - eb[k]).abs().max().item() for k in ea))
    assert ema_diff <= 1e-6
    diffs = {"loss": loss_diff, "checkpoint_tensors": diff, "ema": ema_diff}
    print(f"max abs differences vs uninterrupted: {diffs}")
    return diffs


@pytest.fixture(scope="module")
def uninterrupted(ray_session, dataset, tmp_path_factory):
    runs = {}
    for stage in (2, 3):
        run = tmp_path_factory.mktemp(f"zero{stage}") / "run"
        summary = run_training(_cfg(dataset, run, f"train.zero_stage={stage}"))
        assert summary["images_seen"] == TOTAL
        runs[stage] = run
    return runs


def test_zero3_interrupted_and_resumed_run_equals_uninterrupted(uninterrupted, dataset, tmp_path):
    """ZeRO-3: stop at 24 images (a committed end-of-run checkpoint), resume to the end.
    (ZeRO-2 resumes in the fault-tolerance test below, after a SIGKILL.)"""
    run = tmp_path / "run"
    run_training(_cfg(dataset, run, "train.zero_stage=3", "train.total_images=24"))
    assert [c.images_seen for c in committed_checkpoints(str(run))] == [16, 24]
    run_training(_cfg(dataset, run, "train.zero_stage=3"))
    _assert_same_run(run, uninterrupted[3])
    assert (run / "samples/000000000064.png").is_file()  # EMA gathered from 2 ZeRO-3 partitions
    manifest = committed_checkpoints(str(run))[-1].manifest
    assert manifest["world_size"] == 2 and len(manifest["ranks"]) == 2
    assert len(manifest["ema"]["files"]) == 2  # each rank stored only its own EMA slices
    # Different data per rank: the two cursors are different readers' positions.
    assert manifest["ranks"][0]["state"]["data"]["rank"] == 0 and manifest["ranks"][1]["state"]["data"]["rank"] == 1


def _train_workers() -> list[psutil.Process]:
    out = []
    for p in psutil.Process(os.getpid()).children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(p.cmdline()):
                out.append(p)
        except psutil.Error:
            pass
    return out


def test_worker_killed_mid_run_is_restarted_and_ends_like_an_undisturbed_run(uninterrupted, dataset, tmp_path):
    """ZeRO-2, 2 workers: SIGKILL one worker after the first commit; Ray's FailureConfig restarts the
    group, which resumes from the newest committed checkpoint and ends with the undisturbed weights."""
    run = tmp_path / "run"
    cfg = _cfg(dataset, run, "train.zero_stage=2", "train.max_failures=2")
    done: dict = {}
    thread = threading.Thread(target=lambda: done.update(run_training(cfg)), daemon=True)
    thread.start()
    killed = None
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and thread.is_alive():
        if (run / "checkpoints/000000000016/manifest.json").exists():
            workers = _train_workers()
            if workers and not (run / f"checkpoints/{TOTAL:012d}/manifest.json").exists():
                killed = workers[-1]
                os.kill(killed.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    assert killed is not None, "training finished before a worker could be killed"
    before = {p.pid for p in workers}
    restarted = False  # Ray restarts the whole group: workers with new process ids appear
    while thread.is_alive() and time.monotonic() < deadline + 300:
        if any(p.pid not in before for p in _train_workers()):
            restarted = True
            break
        time.sleep(0.05)
    thread.join(timeout=300)
    assert restarted, "no new training worker appeared after the SIGKILL (no restart)"
    assert not thread.is_alive(), "training did not finish after the restart"
    assert done.get("images_seen") == TOTAL
    _assert_same_run(run, uninterrupted[2])
