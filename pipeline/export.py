"""Export one EMA of a training checkpoint for serving: safetensors + JSON + a model card.

``export_run(run, out)`` gathers the chosen EMA's full fp32 weights from the per-rank slices of a
committed checkpoint (any ZeRO stage, 3 included: :func:`pipeline.train.checkpoint.load_ema_weights`),
and writes, atomically:

``native`` (default)
    ``model.safetensors``  the bare network's ``state_dict`` (fp32)
    ``objective.safetensors``  the training objective's own parameters (EMA), when it has any
                           (VDM's learned noise schedule gamma); absent otherwise
    ``config.json``        architecture, diffusion process, resolution, class names, EMA rate,
                           images seen, default sampler, provenance, sha256 of the weights
    ``README.md``          model card: training provenance, the run's latest evaluation metrics
                           with theirs, how to load and sample, the exact command that made it
``diffusers``
    ``model_index.json``, ``unet/``, ``scheduler/`` (``DDPMPipeline.from_pretrained``), ``README.md``
    and ``export.json`` (what config.json would hold); see :mod:`pipeline.diffusers_export`.

Nothing is pickled and nothing here imports DeepSpeed or Ray. The folder loads with
:func:`pipeline.pretrained.load_pretrained`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline.config import ExperimentConfig
from pipeline.diffusion.registry import sampler_options
from pipeline.loading import network_state_dict, objective_state_dict
from pipeline.loading import read_run_config as load_run_config
from pipeline.pretrained import (
    CONFIG_FILE,
    EXPORT_FORMAT,
    FORMAT_VERSION,
    OBJECTIVE_FILE,
    WEIGHTS_FILE,
    model_config_dict,
    objective_from_state,
)
from pipeline.train.checkpoint import Checkpoint, load_ema_weights, resolve_checkpoint
from pipeline.train.rundir import RunDir, sha256_file

__all__ = [
    "FORMATS",
    "ExportResult",
    "ExportSource",
    "evaluation_records",
    "export_run",
    "gather_export",
    "load_run_config",
    "model_card",
    "network_state_dict",
    "objective_state_dict",
]

log = logging.getLogger(__name__)

FORMATS = ("native", "diffusers")
CARD_FILE = "README.md"
EXPORT_RECORD = "export.json"  # the config.json record, in a diffusers folder


@dataclass(frozen=True)
class ExportSource:
    """One EMA of one checkpoint, gathered: the bare network's full weights and what describes them."""

    run_url: str
    checkpoint: Checkpoint
    ema_rate: float
    config: ExperimentConfig  # <run>/config.yaml, the resolved config training ran with
    network_config: Any  # pipeline.models UNetConfig / ClassifierConfig
    state: dict[str, torch.Tensor]
    # the objective's own parameters without the ``objective.`` prefix (VDM's learned schedule); {} if none
    objective_state: dict[str, torch.Tensor] = field(default_factory=dict)
    # post-hoc EMA (pipeline.posthoc): how the weights were made, instead of a checkpoint's EMA; None otherwise
    posthoc: dict[str, Any] | None = None


@dataclass(frozen=True)
class ExportResult:
    path: str
    format: str
    ema_rate: float
    images_seen: int
    files: tuple[str, ...]
    posthoc_sigma: float | None = None  # post-hoc EMA sigma_rel when the weights are a reconstruction


# ---------------------------------------------------------------------------------------------
# Gathering


def _verify_ema_files(run: RunDir, ckpt: Checkpoint) -> None:
    files = ckpt.files
    for name in ckpt.ema_files:
        meta = files.get(name)
        if meta is None:  # manifests that list no checksums
            continue
        rel = f"{ckpt.rel}/{name}"
        if not run.exists(rel):
            raise ValueError(f"checkpoint {ckpt.rel}: EMA file {name} is missing")
        if run.sha256(rel) != meta["sha256"]:
            raise ValueError(f"checkpoint {ckpt.rel}: EMA file {name} fails its sha256 check (corrupted); "
                             f"choose another checkpoint with --checkpoint")


def _posthoc_source(run_url: str, at: str | int, sigma_rel: float) -> tuple[Checkpoint, dict, dict[str, Any]]:
    """(the snapshot time as a checkpoint record, reconstructed weights, provenance) of a post-hoc EMA."""
    from pipeline.posthoc import posthoc_plan, reconstruct

    plan = posthoc_plan(run_url, sigma_rel, at)
    weights = reconstruct(run_url, sigma_rel, plan=plan)
    last = plan.snapshots[-1]
    manifest = {key: last.manifest.get(key) for key in ("world_size", "config_hash", "model_hash")}
    return Checkpoint(plan.at_images, last.rel, manifest), weights, plan.provenance()


def gather_export(run_url: str, checkpoint: str | int = "latest", ema_rate: float | None = None,
                  posthoc_sigma: float | None = None) -> ExportSource:
    """Full weights of one EMA of a committed checkpoint. ``ema_rate`` None: the run config's
    ``export.ema_rate``, else the checkpoint's first rate. ``posthoc_sigma``: instead, the post-hoc
    EMA of that relative length at ``checkpoint`` (images seen, 'latest': the last snapshot)."""
    if posthoc_sigma is not None:
        if ema_rate is not None:
            raise ValueError("--ema and --posthoc-sigma: give one source of weights, not both")
        ckpt, weights, posthoc = _posthoc_source(run_url, checkpoint, posthoc_sigma)
        # no EMA rate: ema_rate is NaN and config.json records "posthoc_ema" instead
        return _export_source(run_url, ckpt, float("nan"), weights, load_run_config(run_url), posthoc)
    ckpt = resolve_checkpoint(run_url, checkpoint)
    cfg = load_run_config(run_url)
    if ema_rate is None:
        ema_rate = cfg.export.ema_rate
    rates = ckpt.ema_rates
    if ema_rate is not None and not any(abs(r - float(ema_rate)) < 1e-12 for r in rates):
        raise ValueError(f"ema rate: {ema_rate!r} is not held by checkpoint {ckpt.rel} of run {run_url!r}; "
                         f"it holds {rates}")
    run = RunDir(run_url)
    _verify_ema_files(run, ckpt)
    weights, _manifest = load_ema_weights(run_url, ckpt.images_seen, ema_rate)
    rate = float(ema_rate) if ema_rate is not None else rates[0]
    return _export_source(run_url, ckpt, rate, weights, cfg)


def _export_source(run_url: str, ckpt: Checkpoint, rate: float, weights: dict[str, torch.Tensor],
                   cfg: ExperimentConfig, posthoc: dict[str, Any] | None = None) -> ExportSource:
    """The bare network's and the objective's weights, checked strictly against the run's config."""
    from pipeline.models import build_model_from_config

    state = {k: v.contiguous() for k, v in network_state_dict(weights).items()}
    objective_state = {k: v.contiguous() for k, v in objective_state_dict(weights).items()}
    objective_from_state(cfg.diffusion, objective_state, f"checkpoint {ckpt.rel}")  # strict names and shapes
    with torch.device("meta"):  # only the structure is needed: no initialisation, no RNG use
        net = build_model_from_config(cfg.model)
    try:
        net.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise ValueError(f"checkpoint {ckpt.rel}: its EMA weights do not fit the network of {run_url}/config.yaml: "
                         f"{str(exc).splitlines()[0]}") from None
    return ExportSource(run_url, ckpt, rate, cfg, net.config, state, objective_state, posthoc)


def class_names(cfg: ExperimentConfig, num_classes: int) -> tuple[str, ...] | None:
    """Class names from the dataset manifest (None when unconditional or unreadable, with a warning)."""
    if not num_classes:
        return None
    try:
        from pipeline.data.shards import read_manifest

        classes = tuple(read_manifest(cfg.data.url).classes)
    except Exception as exc:  # noqa: BLE001 - data moved, no credentials, ...: names are optional
        log.warning("class names: dataset manifest at %s is not readable (%s); exporting without names",
                    cfg.data.url, exc)
        return None
    if len(classes) != num_classes:
        log.warning("class names: the dataset lists %d classes, the network has %d; exporting without names",
                    len(classes), num_classes)
        return None
    return classes


def evaluation_records(run_url: str) -> list[dict[str, Any]]:
    """Every finished evaluation of the run (``<run>/eval/<checkpoint>/<name>/metrics.json``), oldest first."""
    run = RunDir(run_url)
    out = []
    for ckpt_name in run.list_dirs("eval"):
        for name in run.list_dirs(f"eval/{ckpt_name}"):
            rel = f"eval/{ckpt_name}/{name}/metrics.json"
            if not run.exists(rel):
                continue
            try:
                record = json.loads(run.read_bytes(rel))
            except (ValueError, OSError) as exc:
                log.warning("evaluation %s: unreadable (%s); skipped", rel, exc)
                continue
            if isinstance(record, dict) and isinstance(record.get("metrics"), dict):
                out.append({**record, "_url": run.join(rel)})
    return sorted(out, key=lambda r: (str(r.get("created_utc", "")), r["_url"]))


def select_metrics(records: list[dict[str, Any]], images_seen: int, ema_rate: float,
                   posthoc_sigma: float | None = None) -> tuple[list[dict], str]:
    """Evaluations of this checkpoint and EMA (or post-hoc EMA length); else the run's latest evaluation, said so."""
    def same(r: dict) -> bool:
        ck = r.get("checkpoint") or {}
        if ck.get("images_seen") != images_seen:
            return False
        sigma = (r.get("posthoc_ema") or {}).get("sigma_rel")
        if posthoc_sigma is not None or sigma is not None:
            return sigma is not None and posthoc_sigma is not None and abs(float(sigma) - posthoc_sigma) < 1e-12
        return r.get("ema_rate") is not None and abs(float(r["ema_rate"]) - ema_rate) < 1e-12

    exact = [r for r in records if same(r)]
    if exact:
        return exact, "evaluations of the exported checkpoint and EMA rate"
    if records:
        return [records[-1]], ("no evaluation of the exported checkpoint and EMA rate exists; this is the run's "
                               "latest evaluation, of a different checkpoint or EMA rate")
    return [], "the run has no finished evaluation"


def _metric_summary(record: dict[str, Any]) -> dict[str, Any]:
    ck = record.get("checkpoint") or {}
    extractor = record.get("feature_extractor") or {}
    return {
        "metrics": record.get("metrics", {}),
        "checkpoint": ck.get("name"),
        "images_seen": ck.get("images_seen"),
        "ema_rate": record.get("ema_rate"),
        "posthoc_sigma": (record.get("posthoc_ema") or {}).get("sigma_rel"),
        "name": record.get("name"),
        "sampler": record.get("sampler"),
        "num_samples": record.get("num_samples"),
        "eval_seed": (record.get("seeds") or {}).get("eval_seed"),
        "feature_extractor": extractor.get("feature_extractor"),
        "feature_weights_sha256": extractor.get("weights_sha256"),
        "reference": record.get("reference"),
        "cascade": record.get("cascade"),
        "created_utc": record.get("created_utc"),
        "url": record.get("_url"),
    }


def _cascade_text(e: dict[str, Any]) -> str:
    """The model card's words for an evaluation of the ADM-U cascade (empty for the model alone)."""
    up = e.get("cascade")
    if not up:
        return ""
    src = up.get("source") or {}
    where = src.get("run") or src.get("path")
    at = f", checkpoint {src['checkpoint']}" if src.get("checkpoint") else ""
    return (f", upsampled to {up.get('resolution')}x{up.get('resolution')} by `{where}`{at} (EMA "
            f"{_fmt(src.get('ema_rate'))}, {up.get('sampler')} {up.get('steps')} steps, noise level "
            f"{_fmt(up.get('noise_level'))}): metrics of the cascade")


# ---------------------------------------------------------------------------------------------
# Writing


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for dist in ("torch", "safetensors", "diffusers", "diffusion-pipeline"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def export_document(src: ExportSource, weights_file: str, weights_sha256: str, weights_bytes: int, command: str,
                    metrics: list[dict], metrics_note: str,
                    objective_weights: dict[str, Any] | None = None) -> dict[str, Any]:
    """What ``config.json`` holds (native format). ``objective_weights``: ``{"file", "sha256", "bytes"}``
    of the objective's parameters file, recorded (with the tensor count) when there is one."""
    cfg, ck = src.config, src.checkpoint
    net_cfg = model_config_dict(src.network_config)
    num_classes = int(net_cfg.get("num_classes", 0) or 0)
    doc = {
        "format": EXPORT_FORMAT,
        "format_version": FORMAT_VERSION,
        "model": net_cfg,
        "model_preset": cfg.model.model_dump(mode="json"),
        "diffusion": cfg.diffusion.model_dump(mode="json"),
        "resolution": int(net_cfg.get("image_size", cfg.data.resolution)),
        "in_channels": int(net_cfg.get("in_channels", 3)),
        "num_classes": num_classes,
        "class_names": list(class_names(cfg, num_classes) or []) or None,
        "sampling": {"sampler": cfg.eval.sampler, "steps": cfg.eval.steps, "eta": cfg.eval.eta,
                     **sampler_options(cfg.eval.sampler, cfg.eval.model_dump()).model_dump()},
        "ema_rate": src.ema_rate,
        "images_seen": ck.images_seen,
        "step": ck.step,
        "source": {
            "run": src.run_url,
            "checkpoint": ck.rel,
            "ema_updates": ck.ema_updates,
            "ema_rates_in_checkpoint": ck.ema_rates,
            "world_size": ck.world_size,
            "config_hash": ck.config_hash,
            "model_hash": ck.model_hash,
            "zero_stage": cfg.train.zero_stage,
            "precision": cfg.train.precision,
            "dataset": cfg.data.url,
            "init_from": init_from_record(src.run_url, cfg),
        },
        "weights": {"file": weights_file, "sha256": weights_sha256, "bytes": weights_bytes, "dtype": "float32",
                    "num_parameters": int(sum(t.numel() for t in src.state.values()))},
        "metrics": {"note": metrics_note, "evaluations": [_metric_summary(r) for r in metrics]},
        "command": command,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": _versions(),
    }
    if src.posthoc is not None:  # no EMA rate: the weights are a post-hoc reconstruction
        del doc["ema_rate"]
        doc["posthoc_ema"] = src.posthoc
        doc["source"].pop("ema_updates")
        doc["source"].pop("ema_rates_in_checkpoint")
        doc["source"]["checkpoint"] = None
        doc["source"]["last_snapshot"] = ck.rel
    if objective_weights is not None:
        doc["objective_weights"] = {**objective_weights, "dtype": "float32",
                                    "num_parameters": int(sum(t.numel() for t in src.objective_state.values()))}
    return doc


def init_from_record(run_url: str, cfg: ExperimentConfig) -> dict[str, Any] | None:
    """What the run was fine-tuned from: ``<run>/init_from.json`` (written at its start), else the
    config's ``train.init_from`` request; None for a run trained from scratch."""
    from pipeline.train.init import INIT_RECORD

    if cfg.train.init_from is None:
        return None
    run = RunDir(run_url)
    if run.exists(INIT_RECORD):
        try:
            return json.loads(run.read_bytes(INIT_RECORD))
        except ValueError as exc:
            log.warning("%s: unreadable (%s); recording the configured train.init_from only", INIT_RECORD, exc)
    return cfg.train.init_from.model_dump(mode="json")


def _init_from_line(src: dict[str, Any]) -> list[str]:
    init = src.get("init_from")
    if not init:
        return []
    origin = init.get("source") or {}
    where = f"`{init.get('path')}`"
    if origin.get("kind") == "checkpoint":
        where += f" (checkpoint {origin.get('checkpoint')}, EMA {origin.get('ema_rate')})"
    digest = f", network sha256 `{str(init['network_sha256'])[:16]}`" if init.get("network_sha256") else ""
    classes = f"; {init['classes']}" if init.get("classes") else ""
    return [f"| fine-tuned from | {where}{digest}{classes} |"]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else str(value)


def model_card(doc: dict[str, Any], fmt: str = "native") -> str:
    """README.md of an export: what the model is, where it came from, how good it is, how to use it."""
    model, diff, src = doc["model"], doc["diffusion"], doc["source"]
    names = doc.get("class_names")
    objective_note = ("; the objective's learned parameters (noise schedule) in objective.safetensors"
                      if doc.get("objective_weights") else "")
    posthoc = doc.get("posthoc_ema")
    which = (f"post-hoc EMA sigma_rel {posthoc['sigma_rel']:g}" if posthoc else f"EMA {doc['ema_rate']:g}")
    if posthoc:
        ema_row = (f"| EMA | post-hoc (EDM2): power-function EMA with sigma_rel {posthoc['sigma_rel']:g} (gamma "
                   f"{posthoc['gamma']:.3f}) at {posthoc['at_images']:,} images, reconstructed by least squares from "
                   f"{posthoc['num_snapshots']} snapshots of the tracked profiles {posthoc['tracked_sigma_rels']} "
                   f"(profile misfit {posthoc['profile_relative_error']:.1e} relative L2) |")
    else:
        ema_row = (f"| EMA rate | {doc['ema_rate']:g} ({src.get('ema_updates')} updates; the checkpoint holds "
                   f"{src.get('ema_rates_in_checkpoint')}) |")
    lines = [
        f"# {Path(src['run']).name or 'diffusion model'}: {which} at {doc['images_seen']:,} images",
        "",
        (f"A {doc['resolution']}x{doc['resolution']} pixel-space diffusion model "
         f"({'class-conditional, ' + str(doc['num_classes']) + ' classes' if doc['num_classes'] else 'unconditional'}), "
         f"{'reconstructed from the post-hoc EMA snapshots' if posthoc else 'exported from a training checkpoint'} "
         f"of this project's pipeline "
         f"({'native format: model.safetensors + config.json' if fmt == 'native' else 'diffusers format'}"
         f"{objective_note})."),
        "",
        "## Model",
        "",
        "| field | value |",
        "|---|---|",
        (f"| network | {model.get('architecture')} (preset `{doc['model_preset'].get('preset')}`), "
         f"{doc['weights']['num_parameters']:,} parameters, fp32 |"),
        (f"| channels | base {model.get('base_channels')}, multipliers {model.get('channel_mult')}, "
         f"{model.get('num_res_blocks')} residual blocks per level, attention at {model.get('attention_resolutions')} |"),
        (f"| diffusion | objective `{diff['objective']}`, `{diff['schedule']}` schedule, T = {diff['timesteps']}, "
         f"predicts `{diff['parameterization']}`, variance `{diff['variance']}` |"),
        f"| classes | {', '.join(names) if names else ('unavailable' if doc['num_classes'] else 'none')} |",
        (f"| null class (guidance) | {doc['num_classes'] if doc['num_classes'] else 'n/a'} "
         f"(trained with label dropout {diff.get('label_dropout', 0)}) |"),
        "",
        "## Provenance",
        "",
        "| field | value |",
        "|---|---|",
        f"| run | `{src['run']}` |",
        (f"| snapshots | `{src.get('last_snapshot')}` and the earlier ones |" if posthoc
         else f"| checkpoint | `{src['checkpoint']}` |"),
        f"| images seen | {doc['images_seen']:,}" + (f" (step {doc['step']})" if doc.get("step") is not None else "") + " |",
        ema_row,
        f"| training | {src.get('world_size')} workers, ZeRO stage {src.get('zero_stage')}, {src.get('precision')} |",
        f"| dataset | `{src.get('dataset')}` |",
        *_init_from_line(src),
        f"| config hash | `{src.get('config_hash')}` |",
        f"| weights sha256 | `{doc['weights']['sha256']}` |",
        f"| created | {doc['created_utc']} |",
        "",
        "## Evaluation",
        "",
        f"{doc['metrics']['note'][:1].upper()}{doc['metrics']['note'][1:]}.",
        "",
    ]
    evaluations = doc["metrics"]["evaluations"]
    if evaluations:
        keys = sorted({k for e in evaluations for k, v in e["metrics"].items() if isinstance(v, (int, float))})
        lines += ["| checkpoint | EMA | evaluation | samples | " + " | ".join(keys) + " |",
                  "|---|---|---|---|" + "---|" * len(keys)]
        for e in evaluations:
            ema = _fmt(e["ema_rate"]) if e.get("posthoc_sigma") is None else f"post-hoc {e['posthoc_sigma']:g}"
            lines.append(f"| {e['checkpoint']} | {ema} | {e['name']} | {e['num_samples']} | "
                         + " | ".join(_fmt(e["metrics"].get(k)) for k in keys) + " |")
        lines.append("")
        for e in evaluations:
            ref = e.get("reference") or {}
            ref_text = "none"
            if ref:
                ref_text = (f"`{ref.get('dataset_url')}` ({ref.get('count')} images, manifest sha256 "
                            f"{str(ref.get('manifest_sha256'))[:12]})")
            weights = f" (weights sha256 {e['feature_weights_sha256'][:12]})" if e.get("feature_weights_sha256") else ""
            lines.append(f"- `{e['name']}` (checkpoint {e['checkpoint']}): sampler {json.dumps(e['sampler'])}, "
                         f"{e['num_samples']} samples, eval seed {e['eval_seed']}, features "
                         f"{e['feature_extractor']}{weights}, reference {ref_text}{_cascade_text(e)}, "
                         f"created {e['created_utc']}; "
                         f"full provenance: `{e['url']}`")
        lines.append("")
    if fmt == "native":
        lines += [
            "## Use",
            "",
            "```python",
            "from pipeline import load_pretrained",
            "",
            "model, config = load_pretrained(\"path/to/this/folder\")  # no DeepSpeed, no Ray, no pickle",
            "```",
            "",
            "```bash",
            (f"python launch/sample.py --model path/to/this/folder --num 64 --sampler {doc['sampling']['sampler']} "
             f"--steps {doc['sampling']['steps']} --seed 0 --out grid.png"),
            "```",
            "",
            ("`launch/sample.py` draws image i from seed `evaluation.sampling.sample_seed(seed, i)` with the same "
             "code as the evaluation stage, so its images equal the evaluation's for the same seed."),
            "",
        ]
    else:
        lines += [
            "## Use",
            "",
            "```python",
            "from diffusers import DDPMPipeline",
            "",
            "pipe = DDPMPipeline.from_pretrained(\"path/to/this/folder\")",
            f"images = pipe(batch_size=4, num_inference_steps={diff['timesteps']}).images",
            "```",
            "",
            "The scheduler's betas are the training schedule's, exactly (`trained_betas`).",
            "",
        ]
        if doc["num_classes"]:
            lines += [(f"The UNet is class-conditional: `DDPMPipeline` passes no labels, so call "
                       f"`unet(x, t, class_labels=y)` in a sampling loop (label {doc['num_classes']} is the null "
                       f"class)."), ""]
    lines += ["## Made by", "", "```bash", doc["command"], "```", ""]
    return "\n".join(lines)


def _default_command(run_url: str, out: str, checkpoint: str | int, ema_rate: float | None, fmt: str,
                     posthoc_sigma: float | None = None) -> str:
    extra = f", posthoc_sigma={posthoc_sigma!r}" if posthoc_sigma is not None else ""
    return (f"pipeline.export.export_run({run_url!r}, {out!r}, checkpoint={checkpoint!r}, ema_rate={ema_rate!r}, "
            f"fmt={fmt!r}{extra})")


def _check_output(out: str, run_url: str, overwrite: bool) -> None:
    from pipeline.data import storage

    if storage.is_s3(out):
        if storage.exists(out) and not overwrite:
            raise ValueError(f"--out: {out!r} exists; pass --overwrite to replace it")
        return
    path = Path(out).expanduser().resolve()
    if not RunDir(run_url).is_s3:
        run = Path(run_url).expanduser().resolve()
        if path == run or run.is_relative_to(path):
            raise ValueError(f"--out: {out!r} is not allowed; it would replace the run directory {run_url!r}")
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise ValueError(f"--out: {out!r} exists; pass --overwrite to replace it")
        if path.is_dir() and any(path.iterdir()) and not any(
                (path / f).exists() for f in (CONFIG_FILE, "model_index.json", CARD_FILE)):
            raise ValueError(f"--out: {out!r} is a non-empty folder that holds no export; refusing to replace it "
                             f"even with --overwrite")


def _publish(staging: Path, out: str, overwrite: bool) -> None:
    """Move the finished folder into place (local: by rename, so a reader never sees half an export)."""
    from pipeline.data import storage

    if storage.is_s3(out):
        if overwrite and storage.exists(out):
            storage.delete_prefix(out.rstrip("/") + "/")
        for path in sorted(p for p in staging.rglob("*") if p.is_file()):
            storage.upload_file(str(path), storage.join(out, path.relative_to(staging).as_posix()))
        return
    dest = Path(out).expanduser()
    staging.chmod(0o755)  # mkdtemp makes it private
    old = None
    if dest.exists() or dest.is_symlink():
        old = dest.with_name(f".{dest.name}.replaced-{os.getpid()}")
        os.replace(dest, old)
    os.replace(staging, dest)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


def _staging_dir(out: str) -> Path:
    from pipeline.data import storage

    if storage.is_s3(out):
        return Path(tempfile.mkdtemp(prefix="export-"))
    dest = Path(out).expanduser()
    dest.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))


def export_run(run_url: str, out: str, *, checkpoint: str | int = "latest", ema_rate: float | None = None,
               fmt: str | None = None, overwrite: bool = False, command: str | None = None,
               posthoc_sigma: float | None = None) -> ExportResult:
    """Export one EMA of a committed checkpoint of ``run_url`` to the folder ``out`` (local or s3://).

    ``ema_rate`` / ``fmt`` None: the run config's ``export`` section (EMA: else the checkpoint's first).
    ``posthoc_sigma``: export the post-hoc EMA of that relative length instead (``checkpoint``: the
    time in images seen, 'latest' the last snapshot), reconstructed from ``<run>/posthoc_ema``.
    """
    from safetensors.torch import save_file

    if fmt is None:
        if posthoc_sigma is None:
            resolve_checkpoint(run_url, checkpoint)  # "no committed checkpoint" before "no config.yaml"
        fmt = load_run_config(run_url).export.format
    if fmt not in FORMATS:
        raise ValueError(f"--format: {fmt!r} is not allowed; use one of {', '.join(FORMATS)}")
    if not out:
        raise ValueError("--out: '' is not allowed; give the folder to write")
    _check_output(out, run_url, overwrite)
    src = gather_export(run_url, checkpoint, ema_rate, posthoc_sigma)
    if fmt == "diffusers":
        from pipeline.diffusers_export import check_mappable

        check_mappable(src.network_config, src.config.diffusion)  # refuse before writing anything
    command = command or _default_command(run_url, out, checkpoint, ema_rate, fmt, posthoc_sigma)
    sigma = src.posthoc["sigma_rel"] if src.posthoc else None
    records, note = select_metrics(evaluation_records(run_url), src.checkpoint.images_seen, src.ema_rate, sigma)
    staging = _staging_dir(out)
    objective_weights = None
    try:
        if fmt == "native":
            weights_file = WEIGHTS_FILE
            save_file(src.state, str(staging / weights_file), metadata={"format": "pt", "export_format": EXPORT_FORMAT})
            if src.objective_state:
                objective_path = staging / OBJECTIVE_FILE
                save_file(src.objective_state, str(objective_path),
                          metadata={"format": "pt", "export_format": EXPORT_FORMAT})
                objective_weights = {"file": OBJECTIVE_FILE, "sha256": sha256_file(objective_path),
                                     "bytes": objective_path.stat().st_size}
        else:
            from pipeline.diffusers_export import UNET_WEIGHTS, write_diffusers

            weights_file = UNET_WEIGHTS
            write_diffusers(staging, src.state, src.network_config, src.config.diffusion)
        weights_path = staging / weights_file
        doc = export_document(src, weights_file, sha256_file(weights_path), weights_path.stat().st_size, command,
                              records, note, objective_weights)
        # native: config.json is what load_pretrained reads; diffusers: the same record as export.json
        # (a config.json at the top would be mistaken for a model config by diffusers).
        (staging / (CONFIG_FILE if fmt == "native" else EXPORT_RECORD)).write_text(json.dumps(doc, indent=2) + "\n")
        (staging / CARD_FILE).write_text(model_card(doc, fmt))
        files = tuple(sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file()))
        _publish(staging, out, overwrite)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return ExportResult(out, fmt, src.ema_rate, src.checkpoint.images_seen, files, sigma)
