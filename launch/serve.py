"""Serve an exported model over HTTP with Ray Serve (``evaluation.serving``).

    python launch/serve.py --model EXPORT_DIR|s3://... [--replicas N] [--max-batch B] [--batch-wait-ms MS]
                           [--max-num N] [--max-steps S] [--timeout-s T] [--device cpu|cuda]
                           [--cpus-per-replica C] [--gpus-per-replica G]
                           [--host 127.0.0.1] [--port 8000] [--address RAY_ADDRESS]

Endpoints: ``POST /generate`` with a JSON object (fields num, seed, class_label, sampler, steps,
eta, guidance_scale; all optional) answers one PNG for num = 1 and a zip of PNGs plus samples.json
for num > 1, with the seeds and labels in the X-Seeds / X-Labels headers; image i has seed
``evaluation.seeds.sample_seed(seed, i)``, so it equals ``launch/sample.py``'s image i.
``GET /healthz``; ``GET /model`` (the export's config, model card and the serving limits).

Without ``--address`` / ``RAY_ADDRESS`` Ray starts in this process on 127.0.0.1 and the HTTP proxy
binds ``--host`` (127.0.0.1 by default). Ray Serve has no authentication of its own: to serve
beyond this machine, keep ``--host 127.0.0.1`` and put an authenticating reverse proxy on the same
host in front of it (nginx with basic auth or mTLS, oauth2-proxy), or bind ``--host`` to an
interface only that proxy can reach. Runs until SIGINT / SIGTERM. Bad input exits with status 2.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import socket
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

APP_NAME = "diffusion"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from evaluation.serving import ServeLimits

    d = ServeLimits()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="exported model folder or s3:// prefix (launch/export.py)")
    p.add_argument("--replicas", type=int, default=1, help="replicas of the model (default 1)")
    p.add_argument("--max-batch", type=int, default=d.max_batch, help=f"images per network batch ({d.max_batch})")
    p.add_argument("--batch-wait-ms", type=float, default=d.batch_wait_s * 1000,
                   help=f"how long a batch waits to fill ({d.batch_wait_s * 1000:g} ms)")
    p.add_argument("--max-num", type=int, default=d.max_num, help=f"images per request ({d.max_num})")
    p.add_argument("--max-steps", type=int, default=d.max_steps, help=f"sampler steps per request ({d.max_steps})")
    p.add_argument("--timeout-s", type=float, default=d.timeout_s, help=f"per-request timeout ({d.timeout_s:g} s)")
    p.add_argument("--device", help="cpu or cuda (default: cuda with --gpus-per-replica > 0)")
    p.add_argument("--cpus-per-replica", type=float, default=1.0, help="CPUs per replica (also its torch threads)")
    p.add_argument("--gpus-per-replica", type=float, default=0.0, help="GPUs per replica")
    p.add_argument("--host", default="127.0.0.1", help="address the HTTP proxy binds (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else Ray starts in-process)")
    return p.parse_args(argv)


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def app_args(args: argparse.Namespace) -> dict:
    """``evaluation.serving.build_app``'s arguments from the flags."""
    out = {"model": args.model, "replicas": args.replicas, "cpus_per_replica": args.cpus_per_replica,
           "gpus_per_replica": args.gpus_per_replica, "max_batch": args.max_batch,
           "batch_wait_s": args.batch_wait_ms / 1000, "max_num": args.max_num, "max_steps": args.max_steps,
           "timeout_s": args.timeout_s}
    if args.device:
        out["device"] = args.device
    return out


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _check_port(host: str, port: int) -> None:
    if not 0 < port < 65536:
        raise ValueError(f"--port: {port} is not allowed; it must be in 1..65535")
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.bind((host, port))
    except OSError as exc:
        raise ValueError(f"--host/--port: cannot listen on {host}:{port} ({exc.strerror})") from None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from evaluation.serving import build_app, check_servable, read_export_document

    try:
        info = check_servable(read_export_document(args.model), args.model)
        app = build_app(app_args(args))
        if not (args.address or os.environ.get("RAY_ADDRESS")):
            _check_port(args.host, args.port)
    except ValueError as exc:
        return _fail(str(exc))
    if not _is_loopback(args.host):
        print(f"warning: --host {args.host}: Ray Serve has no authentication; anyone who reaches this address can "
              "generate images. Put an authenticating reverse proxy in front of it (README: Serving).", file=sys.stderr)

    import ray
    from ray import serve

    from evaluation.pool import ensure_ray

    ensure_ray(args.address)
    if not (args.address or os.environ.get("RAY_ADDRESS")):  # the embedded Ray: what it has is all there is
        have = ray.cluster_resources()
        for name, per in (("CPU", args.cpus_per_replica), ("GPU", args.gpus_per_replica)):
            if per and args.replicas * per > have.get(name, 0):
                ray.shutdown()
                return _fail(f"--replicas {args.replicas} x --{name.lower()}s-per-replica {per:g} needs "
                             f"{args.replicas * per:g} {name}s; this machine's Ray has {have.get(name, 0):g}")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # Ray's driver would abort on SIGTERM: shut down cleanly
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": args.host, "port": args.port,
                                  # the proxy's end-to-end limit: a backstop behind the replica's own timeout
                                  "request_timeout_s": args.timeout_s + 30})
        try:
            serve.run(app, name=APP_NAME, route_prefix="/")
        except Exception as exc:  # noqa: BLE001 - e.g. a replica could not load the model: Ray's message says why
            print(f"error: the application did not start: {str(exc).strip().splitlines()[0]}", file=sys.stderr)
            return 1
        print(f"serving {args.model} ({info.objective}, samplers {', '.join(info.samplers)}) on "
              f"http://{args.host}:{args.port}: POST /generate, GET /healthz, GET /model", flush=True)
        stop.wait()
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
