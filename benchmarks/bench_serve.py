"""Serving throughput: images/s of 8 concurrent clients vs sequential single requests (Ray Serve batching).

One ``launch/serve.py`` server (Ray started in-process on loopback, one replica) serves a
quickstart export: ``--model runs/quickstart/export/ema`` when given, else the quickstart network
(configs/quickstart.yaml) with its seeded initial weights written as an export folder (throughput
does not depend on training). Each request asks for one image (DDIM, ``--steps``). Phases
alternate under the same machine load:

* sequential: one client, one request at a time (each image is its own network batch);
* concurrent: ``--clients`` clients at once, each sending requests back to back, so Ray Serve's
  dynamic batching draws their images together.

Both phases ask for the same seeds, and the images are checked to be byte-identical (per-image
seeds: an image does not depend on the batch it was drawn in). The JSON reports median images/s,
the ratio concurrent / sequential, the batch sizes seen and the machine.

    .venv/bin/python benchmarks/bench_serve.py      # writes benchmarks/results/serve_cpu.json
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "serve_cpu.json"


def quickstart_export(out: Path) -> Path:
    """The quickstart network (seeded init) as an export folder that ``load_pretrained`` reads."""
    import torch
    from safetensors.torch import save_file

    from pipeline.config import load_config
    from pipeline.models import build_model_from_config
    from pipeline.pretrained import CONFIG_FILE, EXPORT_FORMAT, FORMAT_VERSION, WEIGHTS_FILE, model_config_dict
    from pipeline.train.rundir import sha256_file

    cfg = load_config(ROOT / "configs" / "quickstart.yaml")
    torch.manual_seed(0)
    net = build_model_from_config(cfg.model)
    out.mkdir(parents=True, exist_ok=True)
    save_file(net.state_dict(), str(out / WEIGHTS_FILE))
    doc = {"format": EXPORT_FORMAT, "format_version": FORMAT_VERSION, "model": model_config_dict(net.config),
           "diffusion": cfg.diffusion.model_dump(mode="json"), "resolution": cfg.model.overrides["image_size"],
           "sampling": {"sampler": cfg.eval.sampler, "steps": cfg.eval.steps, "eta": cfg.eval.eta},
           "weights": {"file": WEIGHTS_FILE, "sha256": sha256_file(out / WEIGHTS_FILE)},
           "source": {"note": "benchmarks/bench_serve.py: the quickstart network's seeded initial weights"}}
    (out / CONFIG_FILE).write_text(json.dumps(doc, indent=2) + "\n")
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _generate(port: int, body: dict) -> tuple[bytes, list[int]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        conn.request("POST", "/generate", body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {data[:200]!r}")
        return data, [int(n) for n in resp.getheader("X-Batch-Sizes").split(",")]
    finally:
        conn.close()


def run_phase(port: int, seeds: list[int], clients: int, steps: int) -> tuple[float, dict[int, str], Counter]:
    """images/s for requests of ``seeds`` sent by ``clients`` clients; PNG hashes by seed; batch sizes."""
    pending = list(seeds)
    lock = threading.Lock()
    pngs: dict[int, str] = {}
    sizes: Counter = Counter()
    errors: list[BaseException] = []

    def client():
        while True:
            with lock:
                if not pending:
                    return
                seed = pending.pop(0)
            try:
                data, batch = _generate(port, {"num": 1, "seed": seed, "sampler": "ddim", "steps": steps})
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
                return
            with lock:
                pngs[seed] = hashlib.sha256(data).hexdigest()
                sizes.update(batch)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise errors[0]
    return len(seeds) / elapsed, pngs, sizes


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server (it shuts Serve and Ray down), then SIGKILL whatever is left of its session."""
    import psutil

    def session():
        out = []
        for p in psutil.process_iter():
            try:
                if os.getsid(p.pid) == proc.pid:
                    out.append(p.pid)
            except (ProcessLookupError, PermissionError):
                pass
        return out

    left = session()
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pass
    for pid in set(left) | set(session()):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="an export folder (default: the quickstart network, seeded init)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=32, help="single-image requests per phase")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--batch-wait-ms", type=float, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    model = args.model or str(quickstart_export(tmp / "export"))
    port = _free_port()
    log = tmp / "serve.log"
    cmd = [sys.executable, str(ROOT / "launch" / "serve.py"), "--model", model, "--port", str(port),
           "--max-batch", str(args.max_batch), "--batch-wait-ms", str(args.batch_wait_ms)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while "serving " not in log.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"server did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        seeds = list(range(args.requests))
        run_phase(port, seeds[: args.clients], args.clients, args.steps)  # warm-up: sampler built, batches seen
        rates: dict[str, list[float]] = {"sequential": [], "concurrent": []}
        hashes: dict[str, dict[int, str]] = {}
        sizes: dict[str, Counter] = {"sequential": Counter(), "concurrent": Counter()}
        for rep in range(args.repeats):
            for phase, clients in (("sequential", 1), ("concurrent", args.clients)):
                rate, pngs, seen = run_phase(port, seeds, clients, args.steps)
                rates[phase].append(rate)
                hashes.setdefault(phase, pngs)
                sizes[phase].update(seen)
                print(f"repeat {rep} {phase}: {rate:.2f} images/s", flush=True)
    finally:
        _stop(proc)

    seq, conc = statistics.median(rates["sequential"]), statistics.median(rates["concurrent"])
    result = {
        "benchmark": "Ray Serve (launch/serve.py, 1 replica, 1 CPU): single-image DDIM requests, "
                     f"{args.clients} concurrent clients vs one sequential client",
        "model": args.model or "quickstart network (configs/quickstart.yaml), seeded initial weights",
        "sampler": f"ddim{args.steps}",
        "requests_per_phase": args.requests,
        "max_batch": args.max_batch,
        "batch_wait_ms": args.batch_wait_ms,
        "images_per_second": {"sequential": round(seq, 3), "concurrent": round(conc, 3)},
        "all_runs": {k: [round(v, 3) for v in vs] for k, vs in rates.items()},
        "ratio_concurrent_over_sequential": round(conc / seq, 3),
        "batch_sizes_seen": {k: dict(sorted(v.items())) for k, v in sizes.items()},
        "identical_images_sequential_vs_concurrent": hashes["sequential"] == hashes["concurrent"],
        "machine": {"cpus": os.cpu_count(), "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
                    "python": platform.python_version(), "platform": platform.platform()},
        "created_unix": int(time.time()),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
