"""Serving an export with Ray Serve: a real ``launch/serve.py`` on loopback, against ``launch/sample.py``.

One server for the module (a tiny class-conditional export, Ray started in-process by the
server, its own session so teardown can kill every Ray process it made). Served images must be
byte-identical to ``launch/sample.py``'s for the same seed, sampler and steps; concurrent requests
drawn in one batch must equal the same requests served alone; every bad request gets 400 and the
server keeps answering; every socket the server's processes listen on is on loopback.
"""

from __future__ import annotations

import http.client
import io
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from evaluation.serving import (
    FIELDS,
    BadRequest,
    ModelInfo,
    ServeLimits,
    build_app,
    fetch_export,
    parse_request,
)
from pipeline.export import export_run

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from test_export import TINY_MODEL, make_run  # the export fixture's run layout

TIMEOUT_S = 3.0  # the server's per-request limit: the slow request below runs far longer


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(port: int, method: str, path: str, body: bytes | None = None, timeout: float = 60):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"} if body else {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def _generate(port: int, **fields):
    return _request(port, "POST", "/generate", json.dumps(fields).encode())


def _unzip(data: bytes) -> tuple[list[bytes], dict]:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        names = sorted(n for n in zf.namelist() if n.endswith(".png"))
        return [zf.read(n) for n in names], json.loads(zf.read("samples.json"))


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)))


# class-conditional, 16x16, 1000 trained steps: cheap at a few steps, long at 1000 (the timeout test)
MODEL = {"preset": "tiny", "overrides": {**TINY_MODEL["overrides"], "image_size": 16, "base_channels": 32}}


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    run = make_run(tmp_path_factory.mktemp("serve") / "run", MODEL, diffusion={"timesteps": 1000})
    out = tmp_path_factory.mktemp("serve-export") / "ema"
    export_run(str(run), str(out))
    return out


def _session_pids(sid: int) -> set[int]:
    import psutil

    pids = set()
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid:
                pids.add(p.pid)
        except (ProcessLookupError, PermissionError):
            pass
    return pids


@pytest.fixture(scope="module")
def server(export, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("serve-log") / "serve.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, str(ROOT / "launch" / "serve.py"), "--model", str(export), "--port", str(port),
           "--max-batch", "8", "--batch-wait-ms", "300", "--max-num", "8", "--timeout-s", str(TIMEOUT_S)]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while "serving " not in log.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"server did not start (exit {proc.poll()}):\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield {"port": port, "proc": proc, "log": log}
    finally:
        pids = _session_pids(proc.pid)
        proc.send_signal(signal.SIGTERM)  # serve.py shuts Serve and Ray down
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        for pid in pids | _session_pids(proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _sample_cli(export: Path, out: Path, *args: str) -> tuple[list[bytes], dict]:
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "sample.py"), "--model", str(export),
                           "--out", str(out), *args], check=False, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads((out / "samples.json").read_text())
    return [(out / r["file"]).read_bytes() for r in info["images"]], info


# ---------------------------------------------------------------------------------------------
# A real server


def test_served_images_are_byte_identical_to_sample_cli(server, export, tmp_path):
    port = server["port"]
    cli, info = _sample_cli(export, tmp_path / "a", "--num", "3", "--seed", "5", "--sampler", "ddim", "--steps", "3")
    status, headers, body = _generate(port, num=1, seed=5, sampler="ddim", steps=3)
    assert status == 200 and headers["content-type"] == "image/png", body[:300]
    assert body == cli[0]
    assert headers["x-seeds"] == str(info["images"][0]["seed"])
    assert headers["x-labels"] == str(info["images"][0]["label"])
    status, headers, body = _generate(port, num=3, seed=5, sampler="ddim", steps=3)
    assert status == 200 and headers["content-type"] == "application/zip", body[:300]
    pngs, manifest = _unzip(body)
    assert pngs == cli
    assert manifest["images"] == info["images"]  # index, file, seed, label: the CLI's records
    assert headers["x-seeds"].split(",") == [str(r["seed"]) for r in info["images"]]
    # a fixed label, classifier-free guidance and another sampler (the CLI's main() in this process)
    from launch import sample as sample_cli

    out = tmp_path / "b"
    assert sample_cli.main(["--model", str(export), "--num", "2", "--seed", "9", "--sampler", "ddpm", "--steps", "4",
                            "--class-label", "7", "--guidance-scale", "2", "--out", str(out)]) == 0
    cli = [(out / f"{i:06d}.png").read_bytes() for i in range(2)]
    status, headers, body = _generate(port, num=2, seed=9, sampler="ddpm", steps=4, class_label=7, guidance_scale=2)
    assert status == 200, body[:300]
    assert _unzip(body)[0] == cli and headers["x-labels"] == "7,7"


def test_concurrent_requests_are_batched_and_equal_the_same_requests_alone(server):
    port = server["port"]
    requests = [{"num": 2, "seed": 11, "steps": 3, "class_label": 1}, {"num": 3, "seed": 12, "steps": 3}]
    together: list = [None, None]
    start = threading.Barrier(len(requests))

    def send(i):
        start.wait()
        together[i] = _generate(port, **requests[i])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert all(r is not None and r[0] == 200 for r in together), together
    # drawn in one network batch of all five images (the server waits 300 ms for a batch to fill)
    sizes = {int(n) for _, headers, _ in together for n in headers["x-batch-sizes"].split(",")}
    assert sizes == {5}, sizes
    for req, (_, headers, body) in zip(requests, together):
        status, alone_headers, alone = _generate(port, **req)
        assert status == 200
        assert {int(n) for n in alone_headers["x-batch-sizes"].split(",")} == {req["num"]}
        assert _unzip(alone)[0] == _unzip(body)[0]
        assert alone_headers["x-seeds"] == headers["x-seeds"] and alone_headers["x-labels"] == headers["x-labels"]


BAD_REQUESTS = [
    (b"not json", "body: not valid JSON"),
    (b"[1, 2]", "body: a JSON list is not allowed"),
    (b'{"num": 1, "prompt": "a cat"}', "unknown field 'prompt'; allowed: num, seed"),
    (b'{"num": 0}', "num: 0 is not allowed; it must be in 1..8"),
    (b'{"num": 9}', "num: 9 is not allowed; it must be in 1..8"),
    (b'{"num": "2"}', "num: '2' is not allowed"),
    (b'{"class_label": 10}', "class_label: 10 is not allowed; it must be in 0..9"),
    (b'{"sampler": "pc"}', "sampler: 'pc' is not allowed for objective 'ddpm'; allowed: ddpm, ddim, edm, dpm_solver"),
    (b'{"steps": 0}', "steps: 0 is not allowed"),
    (b'{"sampler": "ddim", "steps": 1001}', "steps: 1001 is not allowed; it must be in 1..1000"),
    (b'{"guidance_scale": -1}', "guidance_scale: -1 is not allowed"),
    (b'{"seed": -3}', "seed: -3 is not allowed"),
]


def test_bad_requests_get_400_and_the_server_keeps_serving(server):
    port = server["port"]
    for body, message in BAD_REQUESTS:
        status, headers, text = _request(port, "POST", "/generate", body)
        assert status == 400, (body, status, text)
        assert message in text.decode(), (body, text)
        assert text.decode().count("\n") == 1, text  # one line
    assert _request(port, "GET", "/generate")[0] == 405
    assert _request(port, "GET", "/nope")[0] == 404
    assert _request(port, "POST", "/generate", b"x" * (65 * 1024))[0] == 413
    # over the server's timeout: 504, and sampling stops at the next step instead of holding the replica
    started = time.monotonic()
    status, _, text = _generate(port, num=8, seed=1, sampler="ddpm", steps=1000, class_label=3, guidance_scale=1)
    assert status == 504 and b"timed out after 3 s" in text, (status, text)
    assert time.monotonic() - started < TIMEOUT_S + 10
    status, _, body = _request(port, "GET", "/healthz")
    assert status == 200 and json.loads(body) == {"status": "ok"}
    started = time.monotonic()
    status, headers, body = _generate(port, seed=3, steps=2)
    assert status == 200 and headers["content-type"] == "image/png"
    assert time.monotonic() - started < 10, "the timed-out batch still held the replica"
    assert server["proc"].poll() is None


def test_model_endpoint_describes_the_export(server, export):
    status, _, body = _request(server["port"], "GET", "/model")
    assert status == 200
    doc = json.loads(body)
    assert doc["config"] == json.loads((export / "config.json").read_text())
    assert doc["model_card"] == (export / "README.md").read_text()
    assert doc["serving"]["fields"] == list(FIELDS)
    assert doc["serving"]["limits"]["max_num"] == 8 and doc["serving"]["num_classes"] == 10


def test_server_listens_on_loopback_only(server):
    import psutil

    pids = _session_pids(server["proc"].pid)
    listening = [c for c in psutil.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN and c.pid in pids]
    assert server["port"] in {c.laddr.port for c in listening}, "the HTTP proxy is not among the server's sockets?"
    exposed = sorted({(c.laddr.ip, c.laddr.port) for c in listening if not _is_loopback(c.laddr.ip)})
    assert not exposed, f"the server listens beyond loopback: {exposed}"


def _is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


# ---------------------------------------------------------------------------------------------
# No server: request parsing, arguments, the CLI's refusals, the export from S3, the cluster files

INFO = ModelInfo("ddpm", ("ddpm", "ddim", "edm", "dpm_solver"), 10, None, "ddim", 50, 0.0)
UNCOND = ModelInfo("ddpm", ("ddpm", "ddim"), 0, None, "ddim", 50, 0.0)


def test_parse_request_defaults_and_refusals():
    limits = ServeLimits(max_num=4)
    req = parse_request(b"{}", INFO, limits)
    assert (req.num, req.seed, req.class_label, req.sampler, req.steps, req.eta, req.guidance_scale) == \
        (1, 0, None, "ddim", 50, 0.0, 0.0)
    assert parse_request(b'{"class_label": null}', INFO, limits).class_label is None
    with pytest.raises(BadRequest, match="class_label: 0 is not allowed; the model is unconditional"):
        parse_request(b'{"class_label": 0}', UNCOND, limits)
    with pytest.raises(BadRequest, match="guidance_scale: 2.0 is not allowed for an unconditional model"):
        parse_request(b'{"guidance_scale": 2}', UNCOND, limits)
    with pytest.raises(BadRequest, match="num: true is not allowed|num: True is not allowed"):
        parse_request(b'{"num": true}', INFO, limits)
    with pytest.raises(BadRequest, match="eta: nan is not allowed|eta: NaN"):
        parse_request(b'{"eta": NaN}', INFO, limits)


def test_build_app_refuses_bad_arguments():
    with pytest.raises(ValueError, match="model: None is not allowed"):
        build_app({})
    with pytest.raises(ValueError, match="unknown argument 'max_batches'"):
        build_app({"model": "x", "max_batches": 2})
    with pytest.raises(ValueError, match="replicas: 0 is not allowed"):
        build_app({"model": "x", "replicas": 0})
    with pytest.raises(ValueError, match="max_batch: 0 is not allowed"):
        build_app({"model": "x", "max_batch": 0})


def test_serve_cli_refuses_bad_input(export, tmp_path, capsys):
    from launch import serve as serve_cli

    assert serve_cli.main(["--model", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert serve_cli.main(["--model", str(export), "--replicas", "0"]) == 2
    assert "replicas: 0 is not allowed" in capsys.readouterr().err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert serve_cli.main(["--model", str(export), "--port", str(busy.getsockname()[1])]) == 2
    assert "cannot listen on 127.0.0.1" in capsys.readouterr().err


def test_export_is_fetched_from_s3(export, s3_bucket):
    from pipeline.data import storage
    from pipeline.pretrained import load_pretrained

    for path in sorted(export.iterdir()):
        storage.upload_file(str(path), f"{s3_bucket}/exports/ema/{path.name}")
    local = fetch_export(f"{s3_bucket}/exports/ema")
    assert sorted(p.name for p in local.iterdir()) == sorted(p.name for p in export.iterdir())
    (a, _), (b, _) = load_pretrained(local), load_pretrained(export)
    assert all(np.array_equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    with pytest.raises(ValueError, match="holds no config.json"):
        fetch_export(f"{s3_bucket}/exports/none")


def _serve_configs():
    serve_yaml = yaml.safe_load((ROOT / "infra" / "ray" / "serve.yaml").read_text())
    service = yaml.safe_load((ROOT / "infra" / "kuberay" / "rayservice.yaml").read_text())
    assert service["kind"] == "RayService"
    return {"infra/ray/serve.yaml": serve_yaml,
            "infra/kuberay/rayservice.yaml": yaml.safe_load(service["spec"]["serveConfigV2"])}, service


def test_serve_configs_validate_and_build_the_app():
    from ray.serve.schema import ServeDeploySchema

    configs, service = _serve_configs()
    for where, config in configs.items():
        schema = ServeDeploySchema.model_validate(config)  # Ray Serve's own schema of a config file
        for app in schema.applications:
            assert app.import_path == "evaluation.serving:build_app", where
            assert app.args["model"].startswith("s3://"), where
            build_app(app.args)  # the arguments are ones the application accepts
    with pytest.raises(Exception, match="import_pat"):
        ServeDeploySchema.model_validate({"applications": [{"name": "x", "import_pat": "evaluation.serving:build_app"}]})
    assert configs["infra/ray/serve.yaml"]["http_options"]["host"] == "127.0.0.1"
    containers = [*service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"],
                  *(c for g in service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
                    for c in g["template"]["spec"]["containers"])]
    assert all("requests" in c.get("resources", {}) for c in containers)
