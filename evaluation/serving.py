"""Serve an export over HTTP with Ray Serve: ``POST /generate``, ``GET /healthz``, ``GET /model``.

One deployment, :class:`ExportServer`, loads an export folder (local or ``s3://``) once per replica
with the same loader and sampler as ``launch/sample.py`` (:func:`load_export_sampler`, the one
place that touches them) and answers

* ``POST /generate`` with a JSON object, every field optional::

      {"num": 4, "seed": 0, "class_label": 3, "sampler": "ddim", "steps": 50, "eta": 0.0,
       "guidance_scale": 0.0}

  ``num == 1``: one PNG (``image/png``); ``num > 1``: a zip (``application/zip``, stored, not
  compressed) of ``000000.png ...`` plus ``samples.json`` (seed, label and class name of each image,
  the same records ``launch/sample.py`` writes). Either way the headers ``X-Seeds`` and (for a
  class-conditional model) ``X-Labels`` list each image's seed and label, and ``X-Batch-Sizes``
  the size of the batch each image was drawn in. Image ``i`` uses seed ``sample_seed(seed, i)``
  (:mod:`evaluation.seeds`); its label is ``class_label`` or, when that is null, drawn from its
  seed. Defaults: the export's evaluation sampler, steps and eta; seed 0; one image.
* ``GET /healthz``: ``{"status": "ok"}`` once the replica has loaded the model.
* ``GET /model``: the export's ``config.json``, its model card and the serving limits.

Batching: every image is one call of a :func:`ray.serve.batch` method, so concurrent requests are
drawn together, up to ``max_batch`` images. Images that share sampler, steps, eta and guidance
scale run as one batch of the network whatever their labels; others wait for their own group.
Each image's noise comes from its own seed, so an image does not depend on the batch it was drawn
in (except a sampler with adaptive steps chosen per batch, the ODE solver: its requests are never
batched with others).

Bad requests get HTTP 400 and a one-line message; a request that runs past ``timeout_s`` gets
504 and its images stop being sampled at the next network call. Nothing a client sends can stop a
replica. Ray Serve has no authentication: the HTTP proxy binds to 127.0.0.1 unless told
otherwise, and anything wider belongs behind an authenticating reverse proxy (README, Serving).
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
import math
import tempfile
import time
import zipfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from ray import serve

from evaluation.seeds import image_records
from pipeline.diffusion.registry import SAMPLERS

__all__ = [
    "FIELDS",
    "BadRequest",
    "ExportSampler",
    "ExportServer",
    "GenerateRequest",
    "ModelInfo",
    "ServeLimits",
    "build_app",
    "check_servable",
    "fetch_export",
    "load_export_sampler",
    "parse_request",
    "png_bytes",
    "read_export_document",
    "zip_images",
]

log = logging.getLogger(__name__)

FIELDS = ("num", "seed", "class_label", "sampler", "steps", "eta", "guidance_scale")
MAX_BODY_BYTES = 64 * 1024
MAX_SEED = 2**63 - 1
_EXPORT_FILES_REQUIRED = ("config.json",)


class BadRequest(ValueError):
    """A request the server refuses with HTTP 400; the message is one line."""


class SamplingTimeout(RuntimeError):
    """Raised from inside the network call once a batch's requests have all run out of time."""


# ---------------------------------------------------------------------------------------------
# Limits, requests, the model's description


@dataclass(frozen=True)
class ServeLimits:
    """What a replica allows and how it batches; the same fields as ``launch/serve.py``'s flags."""

    max_num: int = 64  # images per request
    max_steps: int = 1000  # sampler steps per request
    max_batch: int = 16  # images per network batch (Ray Serve's max_batch_size)
    batch_wait_s: float = 0.02  # how long a batch waits to fill (Ray Serve's batch_wait_timeout_s)
    timeout_s: float = 120.0  # per request, on the replica
    device: str = "cpu"
    threads: int = 1  # torch intra-op threads of a replica

    def __post_init__(self) -> None:
        for name in ("max_num", "max_steps", "max_batch", "threads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: {value!r} is not allowed; it must be an integer >= 1")
        if not (math.isfinite(self.batch_wait_s) and self.batch_wait_s >= 0):
            raise ValueError(f"batch_wait_s: {self.batch_wait_s!r} is not allowed; it must be >= 0")
        if not (math.isfinite(self.timeout_s) and self.timeout_s > 0):
            raise ValueError(f"timeout_s: {self.timeout_s!r} is not allowed; it must be > 0")
        if self.device.split(":")[0] not in ("cpu", "cuda"):
            raise ValueError(f"device: {self.device!r} is not allowed; use cpu or cuda")


@dataclass(frozen=True)
class ModelInfo:
    """What request validation needs to know about an export (from its config.json alone)."""

    objective: str
    samplers: tuple[str, ...]
    num_classes: int
    class_names: tuple[str, ...] | None
    default_sampler: str
    default_steps: int
    default_eta: float
    timesteps: int = 0  # a discrete objective's trained steps: more sampler steps than these are refused

    @classmethod
    def from_document(cls, doc: dict[str, Any]) -> ModelInfo:
        from evaluation.model_sampling import OBJECTIVE_SAMPLERS
        from pipeline.diffusion.registry import DEFAULT_OBJECTIVE, OBJECTIVES, samplers_for

        objective = str(doc["diffusion"].get("objective", DEFAULT_OBJECTIVE))
        if objective not in OBJECTIVE_SAMPLERS:
            allowed = ", ".join(sorted(OBJECTIVE_SAMPLERS))
            raise ValueError(f"model: objective {objective!r} has no sampler (a noisy classifier is not a generative "
                             f"model); objectives that can be served: {allowed}")
        sampling = doc.get("sampling") or {}
        names = doc.get("class_names")
        options = doc["diffusion"].get("options")  # they may choose the sampling family (a representation base)
        # the same defaults as launch/sample.py
        return cls(objective, samplers_for(objective, options),
                   int(doc["model"].get("num_classes", 0) or 0), tuple(names) if names else None,
                   str(sampling.get("sampler") or OBJECTIVES[objective].for_options(options).default_sampler),
                   int(sampling.get("steps", 50)), float(sampling.get("eta", 0.0)),
                   int(doc["diffusion"].get("timesteps", 0)) if OBJECTIVES[objective].discrete else 0)


@dataclass(frozen=True)
class GenerateRequest:
    num: int
    seed: int
    class_label: int | None
    sampler: str
    steps: int
    eta: float
    guidance_scale: float

    def group(self) -> tuple:
        """Images of requests with the same group run in one network batch."""
        return (self.sampler, self.steps, self.eta, self.guidance_scale)


def _integer(body: dict, name: str, default: int | None, low: int, high: int) -> int | None:
    value = body.get(name, default)
    if value is None and default is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise BadRequest(f"{name}: {value!r} is not allowed; it must be an integer in {low}..{high}")
    if not low <= value <= high:
        raise BadRequest(f"{name}: {value} is not allowed; it must be in {low}..{high}")
    return value


def _number(body: dict, name: str, default: float) -> float:
    value = body.get(name, default)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
        raise BadRequest(f"{name}: {value!r} is not allowed; it must be a finite number >= 0")
    return float(value)


def parse_request(body: bytes, info: ModelInfo, limits: ServeLimits) -> GenerateRequest:
    """The request a ``POST /generate`` body asks for; :class:`BadRequest` naming what is wrong."""
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"body: not valid JSON ({exc}); send a JSON object such as "
                         f'{{"num": 1, "seed": 0}}') from None
    if not isinstance(doc, dict):
        raise BadRequest(f"body: a JSON {type(doc).__name__} is not allowed; send a JSON object with fields "
                         f"{', '.join(FIELDS)}")
    unknown = sorted(set(doc) - set(FIELDS))
    if unknown:
        raise BadRequest(f"unknown field {unknown[0]!r}; allowed: {', '.join(FIELDS)}")
    num = _integer(doc, "num", 1, 1, limits.max_num)
    seed = _integer(doc, "seed", 0, 0, MAX_SEED)
    if info.num_classes:
        label = _integer(doc, "class_label", None, 0, info.num_classes - 1)
    elif doc.get("class_label") is not None:
        raise BadRequest(f"class_label: {doc['class_label']!r} is not allowed; the model is unconditional")
    else:
        label = None
    sampler = doc.get("sampler", info.default_sampler)
    if sampler not in info.samplers:
        raise BadRequest(f"sampler: {sampler!r} is not allowed for objective {info.objective!r}; "
                         f"allowed: {', '.join(info.samplers)}")
    most = min(limits.max_steps, info.timesteps) if info.timesteps else limits.max_steps
    steps = _integer(doc, "steps", info.default_steps, 1, most)
    eta = _number(doc, "eta", info.default_eta)
    guidance = _number(doc, "guidance_scale", 0.0)
    if guidance and not info.num_classes:
        raise BadRequest(f"guidance_scale: {guidance} is not allowed for an unconditional model")
    return GenerateRequest(num, seed, label, sampler, steps, eta, guidance)


# ---------------------------------------------------------------------------------------------
# The export: where it comes from, how it samples


def _cache_dir(url: str) -> Path:
    return Path(tempfile.gettempdir()) / "diffusion-serve" / hashlib.sha256(url.encode()).hexdigest()[:16]


def fetch_export(url: str) -> Path:
    """A local folder holding the export at ``url``: the folder itself, or for ``s3://`` a copy of
    its files in a cache folder (downloaded each start; the loader checks the weights' sha256)."""
    from pipeline.data import storage

    if not storage.is_s3(url):
        return Path(url).expanduser()
    names = [n for n in storage.list_dir(url) if "/" not in n]
    missing = [n for n in _EXPORT_FILES_REQUIRED if n not in names]
    if missing:
        raise ValueError(f"model: {url!r} holds no {missing[0]}; expected a folder written by launch/export.py")
    local = _cache_dir(url)
    for name in names:
        storage.download_file(storage.join(url, name), local / name)
    return local


def read_export_document(url: str) -> dict[str, Any]:
    """The export's ``config.json``, checked for the format (local or s3://); ValueError if not an export."""
    from pipeline.data import storage
    from pipeline.pretrained import CONFIG_FILE, read_export_config

    if not storage.is_s3(url):
        return read_export_config(Path(url).expanduser())
    with tempfile.TemporaryDirectory(prefix="serve-config-") as tmp:
        if not storage.exists(storage.join(url, CONFIG_FILE)):
            raise ValueError(f"model: {url!r} holds no {CONFIG_FILE}; expected a folder written by launch/export.py")
        storage.download_file(storage.join(url, CONFIG_FILE), Path(tmp) / CONFIG_FILE)
        return read_export_config(tmp)


def check_servable(doc: dict[str, Any], where: str) -> ModelInfo:
    """ModelInfo of an export, or ValueError for one that cannot sample (as ``launch/sample.py``)."""
    from pipeline.config import DiffusionConfig
    from pipeline.diffusion.registry import OBJECTIVES

    info = ModelInfo.from_document(doc)
    diffusion = DiffusionConfig.model_validate(doc["diffusion"])
    if OBJECTIVES[info.objective].has_parameters(diffusion.objective_options()) and not doc.get("objective_weights"):
        raise ValueError(f"model: {where!r}: objective {info.objective!r} has trained parameters of its own (e.g. a "
                         "learned noise schedule) but the folder holds no objective weights (objective.safetensors); "
                         "export the run again with launch/export.py")
    return info


def _deadline_net(model):
    """``model`` behind a check: once ``deadline`` (time.monotonic) has passed, calling it raises
    :class:`SamplingTimeout`, which ends the sampler's loop at its next step."""
    import torch

    class DeadlineNet(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net, self.config, self.deadline = net, net.config, None

        def forward(self, *args, **kwargs):
            if self.deadline is not None and time.monotonic() > self.deadline:
                raise SamplingTimeout("the requests of this batch ran out of time")
            return self.net(*args, **kwargs)

    return DeadlineNet(model)


@dataclass
class ExportSampler:
    """An export loaded for sampling: uint8 images from (sampler settings, seeds, labels)."""

    model: Any  # the network behind a deadline check
    config: Any  # pipeline.pretrained.PretrainedConfig
    device: str
    objective: Any = None  # the registry's objective module with the export's parameters
    _fns: dict = field(default_factory=dict)

    def labels(self, seeds: Sequence[int], class_label: int | None) -> np.ndarray | None:
        """Each image's label: ``class_label``, or drawn from its seed (as ``launch/sample.py``)."""
        from evaluation.model_sampling import labels_from_seeds

        if not self.config.num_classes:
            return None
        if class_label is not None:
            return np.full(len(seeds), class_label, dtype=np.int64)
        return labels_from_seeds(np.asarray(seeds, np.int64), self.config.num_classes)

    def generate(self, request: GenerateRequest, seeds: Sequence[int], labels: np.ndarray | None,
                 deadline: float | None = None) -> np.ndarray:
        """(B, H, W, C) uint8: the images ``launch/sample.py`` draws for these seeds and labels with
        the request's sampler, steps, eta and guidance (one network batch)."""
        import torch

        from evaluation.model_sampling import SamplerSettings, make_sample_fn, to_uint8

        key = request.group()
        if key not in self._fns:
            settings = SamplerSettings(request.sampler, request.steps, request.eta,
                                       guidance_scale=request.guidance_scale)
            self._fns[key] = make_sample_fn(self.model, settings, device=self.device,
                                            diffusion=self.config.diffusion.model_dump(mode="json"),
                                            objective=self.objective)
        fn = self._fns[key]
        seeds_t = torch.as_tensor(np.asarray(seeds, np.int64))
        y = torch.as_tensor(labels, device=self.device) if labels is not None else None
        self.model.deadline = deadline
        try:
            with torch.no_grad():
                return to_uint8(fn.draw((len(seeds_t), *fn.shape), seeds_t, y))
        finally:
            self.model.deadline = None


def load_export_sampler(folder: str | Path, device: str = "cpu") -> ExportSampler:
    """The one seam between serving and the model code: load an export folder for sampling."""
    from pipeline.loading import load_model

    loaded = load_model(folder, device=device)
    return ExportSampler(_deadline_net(loaded.network), loaded.config, device, loaded.objective)


# ---------------------------------------------------------------------------------------------
# Responses


def png_bytes(image: np.ndarray) -> bytes:
    """One (H, W, C) uint8 image as PNG, encoded as ``launch/sample.py`` saves it."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buf, format="PNG")
    return buf.getvalue()


def zip_images(pngs: Sequence[bytes], manifest: dict[str, Any]) -> bytes:
    """A stored (uncompressed: PNG is compressed already) zip of the PNGs and samples.json; fixed
    timestamps, so the same images give the same bytes."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for i, data in enumerate(pngs):
            zf.writestr(zipfile.ZipInfo(f"{i:06d}.png", date_time=(1980, 1, 1, 0, 0, 0)), data)
        zf.writestr(zipfile.ZipInfo("samples.json", date_time=(1980, 1, 1, 0, 0, 0)),
                    json.dumps(manifest, indent=1) + "\n")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# The Ray Serve deployment


@dataclass(frozen=True)
class _Image:
    """One image of a request: the unit Ray Serve batches."""

    request: GenerateRequest
    seed: int
    label: int | None
    deadline: float


def _replica_grpc_on_loopback() -> None:
    """Ray Serve 2.60 starts each replica's inter-deployment gRPC server on ``[::]:0`` (every
    interface) whatever the node's address. On a loopback-only node (the embedded Ray of
    ``launch/serve.py``) bind it to 127.0.0.1 instead; on a cluster leave it as it is."""
    import ray

    if ray.util.get_node_ip_address() != "127.0.0.1":
        return
    from ray.serve._private import replica

    original = replica.add_port_to_grpc_server
    if getattr(original, "loopback_only", False):
        return

    def on_loopback(server, address: str):
        host, _, port = address.rpartition(":")
        return original(server, f"127.0.0.1:{port}" if host in ("[::]", "0.0.0.0") else address)

    on_loopback.loopback_only = True
    replica.add_port_to_grpc_server = on_loopback


def _text(status: int, message: str):
    from starlette.responses import PlainTextResponse

    return PlainTextResponse(message.splitlines()[0] + "\n" if message else "\n", status_code=status)


class ExportServer:
    """A replica: the export loaded once, requests answered as the module docstring says."""

    def __init__(self, model_url: str, limits: dict[str, Any]):
        import torch

        _replica_grpc_on_loopback()
        self.limits = ServeLimits(**limits)
        torch.set_num_threads(self.limits.threads)
        self.model_url = model_url
        folder = fetch_export(model_url)
        self.info = check_servable(read_export_document(str(folder)), model_url)
        self.sampler = load_export_sampler(folder, self.limits.device)
        card = folder / "README.md"
        self.card = card.read_text() if card.is_file() else None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sampling")
        self._generate_image.set_max_batch_size(self.limits.max_batch)
        self._generate_image.set_batch_wait_timeout_s(self.limits.batch_wait_s)
        # warm-up: builds the default sampler (and fails the replica on an export that cannot sample)
        first = GenerateRequest(1, 0, None, self.info.default_sampler, 1, self.info.default_eta, 0.0)
        self.sampler.generate(first, [0], self.sampler.labels([0], None))

    async def __call__(self, request):
        try:
            path, method = request.url.path.rstrip("/") or "/", request.method
            routes = {"/generate": "POST", "/healthz": "GET", "/model": "GET"}
            if path not in routes:
                return _text(404, f"path {path!r} not found; endpoints: POST /generate, GET /healthz, GET /model")
            if method != routes[path]:
                return _text(405, f"{method} {path} is not allowed; use {routes[path]} {path}")
            if path == "/healthz":
                from starlette.responses import JSONResponse

                return JSONResponse({"status": "ok"})
            if path == "/model":
                return self._model_response()
            return await self._generate(request)
        except Exception as exc:  # a bug must answer 500, never take the replica down
            log.exception("request failed")
            return _text(500, f"internal error: {type(exc).__name__}: {exc}")

    def _model_response(self):
        from starlette.responses import JSONResponse

        limits = asdict(self.limits)
        return JSONResponse({
            "model": self.model_url,
            "config": self.sampler.config.raw,
            "model_card": self.card,
            "serving": {"fields": list(FIELDS), "samplers": list(self.info.samplers),
                        "defaults": {"num": 1, "seed": 0, "class_label": None, "sampler": self.info.default_sampler,
                                     "steps": self.info.default_steps, "eta": self.info.default_eta,
                                     "guidance_scale": 0.0},
                        "num_classes": self.info.num_classes, "limits": limits,
                        "seed_rule": "image i uses evaluation.seeds.sample_seed(seed, i)",
                        "response": "num == 1: image/png; num > 1: application/zip of 000000.png... + samples.json"},
        })

    async def _generate(self, request):
        from starlette.responses import Response

        from evaluation.seeds import sample_seeds

        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            return _text(413, f"body: {len(body)} bytes is too large; at most {MAX_BODY_BYTES}")
        try:
            req = parse_request(body, self.info, self.limits)
        except BadRequest as exc:
            return _text(400, str(exc))
        seeds = sample_seeds(req.seed, np.arange(req.num))
        labels = self.sampler.labels(seeds, req.class_label)
        deadline = time.monotonic() + self.limits.timeout_s
        images = [_Image(req, int(s), None if labels is None else int(labels[i]), deadline)
                  for i, s in enumerate(seeds)]
        try:
            results = await asyncio.wait_for(asyncio.gather(*(self._generate_image(im) for im in images)),
                                             timeout=self.limits.timeout_s)
        except TimeoutError:
            results = [SamplingTimeout()]
        failed = [r for r in results if isinstance(r, BaseException)]
        if any(isinstance(r, SamplingTimeout) for r in failed):
            return _text(504, f"request timed out after {self.limits.timeout_s:g} s (the server's timeout_s); "
                              f"ask for fewer images or steps")
        if failed and isinstance(failed[0], ValueError):  # the sampler refused the settings
            return _text(400, str(failed[0]))
        if failed:
            raise failed[0]
        pngs = [png_bytes(image) for image, _ in results]
        headers = {"X-Seeds": ",".join(str(int(s)) for s in seeds),
                   "X-Batch-Sizes": ",".join(str(n) for _, n in results)}
        if labels is not None:
            headers["X-Labels"] = ",".join(str(int(v)) for v in labels)
        if req.num == 1:
            return Response(pngs[0], media_type="image/png", headers=headers)
        manifest = {"model": self.model_url, "request": asdict(req),
                    "seed_rule": "image i uses evaluation.seeds.sample_seed(seed, i)",
                    "images": image_records(seeds, labels, self.info.class_names)}
        return Response(zip_images(pngs, manifest), media_type="application/zip", headers=headers)

    @serve.batch(max_batch_size=ServeLimits.max_batch, batch_wait_timeout_s=ServeLimits.batch_wait_s)
    async def _generate_image(self, images: list[_Image]) -> list[Any]:
        """Ray Serve's dynamic batching: one call per image, run as one batch in the sampling thread
        (the event loop keeps answering /healthz meanwhile)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._run_batch, images)

    def _run_batch(self, images: list[_Image]) -> list[Any]:
        """Sample one Ray Serve batch: a network batch per group of compatible images.
        Returns (image, batch size) or the exception for each image."""
        groups: dict[Any, list[int]] = {}
        for i, im in enumerate(images):
            # a sampler with adaptive steps chosen per batch is never batched with other requests
            key = im.request.group() if SAMPLERS[im.request.sampler].batch_exact else (id(im.request),)
            groups.setdefault(key, []).append(i)
        out: list[Any] = [None] * len(images)
        for members in groups.values():
            batch = [images[i] for i in members]
            labels = None if batch[0].label is None else np.array([im.label for im in batch], dtype=np.int64)
            try:
                result = self.sampler.generate(batch[0].request, [im.seed for im in batch], labels,
                                               deadline=max(im.deadline for im in batch))
                for j, i in enumerate(members):
                    out[i] = (result[j], len(batch))
            except Exception as exc:  # noqa: BLE001 - handed to each waiting request
                for i in members:
                    out[i] = exc
        return out


def build_app(args: dict[str, Any]):
    """A Ray Serve application from plain arguments (``serve run``/``serve deploy`` config
    ``import_path: evaluation.serving:build_app``, and ``launch/serve.py``)::

        model: EXPORT (folder or s3:// prefix)   replicas: 1   cpus_per_replica: 1   gpus_per_replica: 0
        max_num, max_steps, max_batch, batch_wait_s, timeout_s, device: see ServeLimits
    """
    args = dict(args)
    model = args.pop("model", None)
    if not isinstance(model, str) or not model:
        raise ValueError(f"model: {model!r} is not allowed; give an export folder or s3:// prefix")
    replicas = args.pop("replicas", 1)
    cpus = args.pop("cpus_per_replica", 1)
    gpus = args.pop("gpus_per_replica", 0)
    if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 1:
        raise ValueError(f"replicas: {replicas!r} is not allowed; it must be an integer >= 1")
    if not isinstance(cpus, (int, float)) or cpus <= 0 or not isinstance(gpus, (int, float)) or gpus < 0:
        raise ValueError(f"cpus_per_replica/gpus_per_replica: ({cpus!r}, {gpus!r}) not allowed; need > 0, >= 0")
    allowed = {f.name for f in ServeLimits.__dataclass_fields__.values()} - {"threads"}
    unknown = sorted(set(args) - allowed)
    if unknown:
        raise ValueError(f"unknown argument {unknown[0]!r}; allowed: model, replicas, cpus_per_replica, "
                         f"gpus_per_replica, {', '.join(sorted(allowed))}")
    args.setdefault("device", "cuda" if gpus else "cpu")
    limits = ServeLimits(**args, threads=max(1, int(cpus)))
    deployment = serve.deployment(
        ExportServer,
        name="ExportServer",
        num_replicas=replicas,
        ray_actor_options={"num_cpus": cpus, "num_gpus": gpus},
        # enough in flight per replica for a batch to fill from concurrent requests
        max_ongoing_requests=max(8, 2 * limits.max_batch),
        health_check_period_s=10,
    )
    return deployment.bind(model, asdict(limits))
