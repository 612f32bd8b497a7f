"""Decoded images/s streamed from SeaweedFS (S3 on loopback) vs the same shards from memory.

The dataset (``builtin:shapes10``, PNG) is prepared once and stored twice: in a SeaweedFS bucket
and in a tmpfs folder (``/dev/shm``: the bytes are in memory, so that run is bound by tar parsing,
PNG decoding and batching alone; it is the ceiling). The same ``ShardReader`` (shuffle buffer,
flips, float batches) reads both, in-process and with 1 and 2 DataLoader workers. Each repetition runs every
(source, workers) pair in turn, so both sources are measured interleaved under the same machine
load; the JSON reports median images/s over repetitions and the ratio S3 / memory (goal >= 0.9).
With 0 workers the CPU time per image of the reading process (and of the SeaweedFS server) is
also recorded: a view of the cost of streaming that does not depend on how loaded the machine is.

    .venv/bin/python benchmarks/bench_data.py          # writes benchmarks/results/data_s3.json

Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the SeaweedFS launcher shared with the tests

from pipeline.data import storage  # noqa: E402
from pipeline.data.prepare import prepare_dataset  # noqa: E402
from pipeline.data.reader import ShardReader  # noqa: E402

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "data_s3.json"


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def images_per_second(url: str, workers: int, batches: int, args, server_pid: int) -> tuple[float, float, float]:
    """(wall-clock images/s, images per CPU-second of this process, per CPU-second of this process
    plus the S3 server): the CPU views are meaningful with 0 workers, where all reading is here."""
    reader = ShardReader(
        url,
        batch_size=args.batch_size,
        loader_workers=workers,
        shuffle_buffer=args.shuffle_buffer,
        seed=0,
        hflip=True,
    )
    it = iter(reader)
    for _ in range(max(2, workers)):  # warm up: workers started, first shards opened
        next(it)
    t0, c0, s0 = time.perf_counter(), time.process_time(), process_cpu_s(server_pid)
    for _ in range(batches):
        next(it)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    server_cpu = process_cpu_s(server_pid) - s0 if url.startswith("s3://") else 0.0
    it.close()
    n = batches * args.batch_size
    return n / elapsed, n / cpu, n / (cpu + server_cpu)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-samples", type=int, default=8000)
    p.add_argument("--shard-size", type=int, default=500)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--shuffle-buffer", type=int, default=1000)
    p.add_argument("--batches", type=int, default=60, help="timed batches per measurement")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args()

    from s3server import SeaweedFS

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="bench-data-"))
    shm = Path(tempfile.mkdtemp(prefix="bench-data-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    server = SeaweedFS(work / "seaweedfs").start()
    try:
        for name, value in server.env().items():
            os.environ[name] = value
        bucket = "s3://" + server.create_bucket("bench")
        t0 = time.perf_counter()
        local = str(shm / "shapes")
        prepare_dataset(
            "builtin:shapes10",
            local,
            shard_size=args.shard_size,
            num_samples=args.num_samples,
            resolution=args.resolution,
            workers=0,
            progress=False,
        )
        remote = bucket + "/shapes"
        for url in storage.list_prefix(local):
            storage.upload_file(url, storage.join(remote, os.path.relpath(url, local)))
        prepare_s = time.perf_counter() - t0
        shard_bytes = sum(os.path.getsize(u) for u in storage.list_prefix(local) if u.endswith(".tar"))

        runs: dict[str, list[float]] = {}
        cpu_runs: dict[str, list[float]] = {}
        for rep in range(args.reps):
            for workers in (0, 1, 2):
                for source, url in (("memory", local), ("s3", remote)):
                    ips, per_cpu_s, per_total_cpu_s = images_per_second(url, workers, args.batches, args, server.proc.pid)
                    runs.setdefault(f"{source}_w{workers}", []).append(ips)
                    if workers == 0:
                        cpu_runs.setdefault(source, []).append(per_cpu_s)
                        cpu_runs.setdefault(source + "_incl_server", []).append(per_total_cpu_s)
                    print(f"rep {rep} workers {workers} {source:6s} {ips:8.0f} images/s", flush=True)
        median = {k: statistics.median(v) for k, v in runs.items()}
        cpu_median = {k: statistics.median(v) for k, v in cpu_runs.items()}
        result = {
            "benchmark": "decoded images/s: ShardReader over SeaweedFS S3 (loopback) vs the same shards in memory",
            "dataset": {
                "source": "builtin:shapes10",
                "format": "png",
                "resolution": args.resolution,
                "samples": args.num_samples,
                "shard_size": args.shard_size,
                "mean_bytes_per_sample": round(shard_bytes / args.num_samples, 1),
            },
            "reader": {"batch_size": args.batch_size, "shuffle_buffer": args.shuffle_buffer, "hflip": True},
            "timed_batches": args.batches,
            "reps": args.reps,
            "images_per_s_median": {k: round(v, 1) for k, v in median.items()},
            "images_per_s_all": {k: [round(x, 1) for x in v] for k, v in runs.items()},
            "ratio_s3_over_memory": {
                f"workers_{w}": round(median[f"s3_w{w}"] / median[f"memory_w{w}"], 3) for w in (0, 1, 2)
            },
            # Median over repetitions of S3/memory measured back to back (the pair shares the load).
            "paired_ratio_median": {
                f"workers_{w}": round(
                    statistics.median(a / b for a, b in zip(runs[f"s3_w{w}"], runs[f"memory_w{w}"], strict=True)), 3
                )
                for w in (0, 1, 2)
            },
            # Load-independent view of the client-side cost: images per CPU-second of the reading
            # process with 0 loader workers (includes the S3 read-ahead thread, not the server).
            "in_process_images_per_cpu_s_median": {k: round(v, 1) for k, v in cpu_median.items()},
            "cpu_ratio_s3_over_memory": round(cpu_median["s3"] / cpu_median["memory"], 3),
            # The same, charging S3 also with the SeaweedFS server's CPU: on a CPU-bound machine
            # where server and reader share the cores, this is the expected throughput ratio.
            "cpu_ratio_s3_incl_server_over_memory": round(cpu_median["s3_incl_server"] / cpu_median["memory"], 3),
            "goal_ratio": 0.9,
            "prepare_and_upload_s": round(prepare_s, 1),
            "machine": {
                "cpus": os.cpu_count(),
                "load_average_1m_at_end": round(os.getloadavg()[0], 2),
                "python": platform.python_version(),
                "torch": torch.__version__,
                "platform": platform.platform(),
            },
            "note": "SeaweedFS runs on the same CPUs as the reader; both sides share the machine's load.",
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result["images_per_s_median"]), json.dumps(result["paired_ratio_median"]))
        print("cpu ratio", result["cpu_ratio_s3_over_memory"], "incl. server", result["cpu_ratio_s3_incl_server_over_memory"])
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(shm, ignore_errors=True)


if __name__ == "__main__":
    main()
