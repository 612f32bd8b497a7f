"""Multi-node training: a Ray cluster of four nodes on this machine, a node killed mid-run.

The cluster is Ray's own ``ray.cluster_utils.Cluster``: a head with no CPUs (the driver joins
it) and three nodes joined to it, each its own raylet with one CPU. Every node is on 127.0.0.1 (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, as the
embedded default in :func:`pipeline.train.ray_launch.init_ray`; ``ray start --address`` would
refuse to join in that mode and, without it, rewrites 127.0.0.1 to the routable address); the test
asserts that no process of the cluster listens beyond loopback. Ray's temp dir is the test's
own (``RAY_TMPDIR``), so no other Ray on this machine finds the cluster.

Nodes share no disk in a real cluster, so the dataset and the run directory are on S3
(SeaweedFS); the raylets get the S3 credentials from their environment, as real nodes do.

Two training workers of one CPU each can only run on two different nodes. After the first
committed checkpoint a node hosting one worker (and not Ray Train's zero-CPU controller, which
Ray may place on any node; losing it ends the run, as losing the head would) is killed (its raylet and every process under
it, SIGKILL): Ray Train's ``FailureConfig`` restarts the worker group on the two remaining
nodes, which resumes from the newest committed checkpoint on S3. Same world size, so the run
must end exactly like an undisturbed run of the same config on the same cluster: same losses,
same final DeepSpeed tensors (weights, Adam moments) and EMAs.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest
from test_train_unit import TINY, assert_same_checkpoint_tensors

from pipeline.config import load_config
from pipeline.data import storage
from pipeline.train.checkpoint import committed_checkpoints, load_ema_weights
from pipeline.train.ray_launch import run_training

pytestmark = pytest.mark.slow

TOTAL = 64  # images; 2 workers x micro-batch 4 = 8 per step -> 8 steps, commits at 16, 32, 48, 64
WORKER_NODES = 3


def _cfg(dataset: str, run: str, address: str):
    return load_config(None, [*TINY, f"data.url={dataset}", f"train.run_dir={run}", f"train.ray_address={address}",
                              "train.num_workers=2", "train.cpus_per_worker=1", "train.micro_batch=4",
                              "train.zero_stage=2", "train.checkpoint_every_images=16", f"train.total_images={TOTAL}",
                              "train.keep_last=10", "train.sample_every_images=0", "train.max_failures=2"])


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _named(procs: list[psutil.Process], name: str) -> list[psutil.Process]:
    out = []
    for p in procs:
        try:
            if name in " ".join(p.cmdline()):
                out.append(p)
        except psutil.Error:
            pass
    return out


def _raylet_pid(node) -> int:
    return node.all_processes["raylet"][0].process.pid


def _workers_per_node(nodes) -> dict:
    """{node: [its RayTrainWorker processes]}: from the OS process tree under each node's raylet."""
    return {n: _named(_descendants(_raylet_pid(n)), "RayTrainWorker") for n in nodes}


@pytest.fixture
def cluster(s3_env, monkeypatch):
    import ray
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    assert not ray.is_initialized()
    temp = tempfile.mkdtemp(prefix="rmn", dir="/tmp")  # short: raylet socket paths have a length limit
    monkeypatch.setenv("RAY_TMPDIR", temp)
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    os.makedirs(f"{temp}/ray")
    c = Cluster()
    try:
        c.add_node(num_cpus=0, node_ip_address="127.0.0.1", include_dashboard=False, temp_dir=f"{temp}/ray")
        nodes = [c.add_node(num_cpus=1, node_ip_address="127.0.0.1") for _ in range(WORKER_NODES)]
        c.wait_for_nodes(timeout=60)
        yield c, nodes
    finally:
        ray.shutdown()
        left = [p for n in (c.head_node, *c.worker_nodes) if n is not None for p in _descendants(_raylet_pid(n))]
        c.shutdown()
        for p in left:  # the nodes' workers, should any outlive their raylet
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.Error:
                pass
        shutil.rmtree(temp, ignore_errors=True)


def _listening_beyond_loopback() -> list[tuple[str, int]]:
    """Listening sockets of this test's process tree (every node's Ray processes, the training
    workers, SeaweedFS) on an address other than loopback."""
    import ipaddress

    pids = {p.pid for p in _descendants(os.getpid())} | {os.getpid()}
    out = set()
    for conn in psutil.net_connections(kind="inet"):
        if conn.status == psutil.CONN_LISTEN and conn.pid in pids:
            ip = ipaddress.ip_address(conn.laddr.ip.split("%")[0])
            if ip.version == 6 and ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped
            if not ip.is_loopback:
                out.add((conn.laddr.ip, conn.laddr.port))
    return sorted(out)


def _losses(run: str) -> dict[int, float]:
    out = {}
    for line in storage.read_bytes(f"{run}/logs/metrics.jsonl").decode().splitlines():
        rec = json.loads(line)
        out[rec["images_seen"]] = rec["loss"]  # a replayed step after a restart overwrites its first record
    return out


def _download(url: str, dest: Path) -> Path:
    for u in storage.list_prefix(url):
        path = dest / u[len(url):].lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(storage.read_bytes(u))
    return dest


def test_node_killed_mid_run_restarts_on_the_other_nodes_and_ends_like_an_undisturbed_run(cluster, s3_bucket, tmp_path):
    import ray

    from pipeline.data.prepare import prepare_dataset

    c, nodes = cluster
    exposed: list = []
    dataset = f"{s3_bucket}/shapes"
    prepare_dataset("builtin:shapes10", dataset, shard_size=64, num_samples=256, workers=0, progress=False)

    # Undisturbed reference on the same cluster.
    ref = f"{s3_bucket}/runs/undisturbed"
    assert run_training(_cfg(dataset, ref, c.address))["images_seen"] == TOTAL
    assert ray.util.get_node_ip_address() == "127.0.0.1"
    assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}

    run = f"{s3_bucket}/runs/killed"
    done: dict = {}
    errors: list = []

    def target():
        try:
            done.update(run_training(_cfg(dataset, run, c.address)))
        except Exception as exc:  # noqa: BLE001 -- reported by the assertion below
            errors.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    victim, placed = None, {}
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and thread.is_alive():
        if storage.exists(f"{run}/checkpoints/{16:012d}/manifest.json"):
            placed = _workers_per_node(nodes)
            if not storage.exists(f"{run}/checkpoints/{TOTAL:012d}/manifest.json"):
                # A node with a training worker but not Ray Train's controller (which holds the run).
                hosts = [n for n, w in placed.items() if w
                         and not _named(_descendants(_raylet_pid(n)), "TrainController")]
                if hosts:
                    exposed = _listening_beyond_loopback()  # every node's raylet, the workers' process group
                    victim = hosts[0]
                    doomed = [psutil.Process(_raylet_pid(victim)), *_descendants(_raylet_pid(victim))]
                    c.remove_node(victim, allow_graceful=False)
                    for p in doomed:  # the whole node: nothing of it survives
                        try:
                            p.send_signal(signal.SIGKILL)
                        except psutil.Error:
                            pass
            break
        time.sleep(0.1)
    assert victim is not None, "training finished (or never committed) before a node could be killed"
    assert not exposed, f"the cluster listens beyond loopback: {exposed}"
    # Before the kill the two workers were on two different nodes.
    assert sorted(len(w) for w in placed.values()) == [0, 1, 1], placed
    before = {p.pid for w in placed.values() for p in w}

    survivors = [n for n in nodes if n is not victim]
    restarted = False  # Ray Train restarts the whole group: new workers appear on the survivors
    while thread.is_alive() and time.monotonic() < deadline + 120:
        now = _workers_per_node(survivors)
        if sum(1 for w in now.values() if any(p.pid not in before for p in w)) == 2:
            restarted = True  # one new worker on each surviving node
            break
        time.sleep(0.1)
    thread.join(timeout=240)
    assert not thread.is_alive(), "training did not finish after the node was killed"
    assert not errors, errors
    assert restarted, "no new worker group on the two surviving nodes after the node was killed"
    assert done.get("images_seen") == TOTAL
    alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert victim.node_id not in alive and {n.node_id for n in survivors} <= alive and len(alive) == WORKER_NODES

    # The new group resumed from a committed checkpoint, not from zero: where the log goes back,
    # it continues one step after a checkpoint (a from-scratch restart would log 8 images again).
    commits = [k.images_seen for k in committed_checkpoints(run)]
    assert commits == [16, 32, 48, 64]
    seen = [json.loads(x)["images_seen"] for x in storage.read_bytes(f"{run}/logs/metrics.jsonl").decode().splitlines()]
    print(f"logged images_seen: {seen}; workers per node before the kill: {[len(w) for w in placed.values()]}")
    assert seen.count(8) == 1, seen
    assert all(b - 8 in commits for a, b in itertools.pairwise(seen) if b <= a), seen

    # Exactly the undisturbed run: losses, final DeepSpeed tensors, EMAs.
    la, lb = _losses(run), _losses(ref)
    assert la.keys() == lb.keys() and max(abs(la[k] - lb[k]) for k in la) == 0.0, (la, lb)
    name = f"checkpoints/{TOTAL:012d}"
    diff = assert_same_checkpoint_tensors(_download(f"{run}/{name}", tmp_path / "a"),
                                          _download(f"{ref}/{name}", tmp_path / "b"))
    assert diff == 0.0, diff
    for rate in (0.9, 0.99):
        ea, _ = load_ema_weights(run, rate=rate)
        eb, _ = load_ema_weights(ref, rate=rate)
        assert ea.keys() == eb.keys() and all((ea[k] == eb[k]).all() for k in ea)
