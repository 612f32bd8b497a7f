"""One-GPU check: training throughput and MFU, precision/compile/layout variants, sampling, DeepSpeed.

For the ADM ImageNet-64 network (``adm_imagenet64``, 296M parameters) and the DDPM CIFAR-10 network
(``ddpm_cifar10``, 35.7M) it measures, in one run of at most ``--budget-s`` seconds (default 450,
under the 8 minutes a short lease allows):

* training images/s of the real training step (the diffusion loss of ``pipeline.diffusion``,
  backward, fused ``torch.optim.AdamW``) for fp32, bf16 autocast and fp16 autocast with a
  ``GradScaler``, eager and ``torch.compile``d, in contiguous and channels-last layout;
* model FLOP utilisation: forward+backward FLOPs per image counted once with
  ``torch.utils.flop_counter.FlopCounterMode``, times images/s, over the H200's dense bf16 peak
  (989 TFLOP/s; the same denominator for every precision, so the figures compare directly);
* peak allocated GPU memory of each variant;
* DDIM-50 sampling images/s (``pipeline.diffusion.ddim_sample``, per-sample seeds, bf16 autocast);
* our DeepSpeed engine (``pipeline.train.engine.build_engine``: ZeRO 0 and 2, nccl, world size 1)
  against the bare step, when deepspeed and pydantic import; otherwise the reason is recorded.

Measurements run in priority order, each with its own time budget; whatever does not fit in what
is left is recorded as skipped with the reason, and the JSON is rewritten after every measurement,
so a run cut short still leaves its results.  The script imports only torch, ``pipeline.models``
and ``pipeline.diffusion`` (pure torch) on its main path: the H200 machine has torch 2.11 and no
ray, deepspeed, pydantic or webdataset (tests/test_gpu_check.py runs ``--dry-run`` with those
imports blocked).

``--dry-run`` runs the same code path on CPU with tiny networks of the same families in seconds
(compile with the ``eager`` backend, so no C++ toolchain is needed); it is part of ``make test``.

Running it on the lent machine (no package registry there; at most 64 MiB of files travel):

    # main path: nothing to install; torch is there.  With the run tool, timeout_s=540:
    PYTHONPATH=$PWD python benchmarks/gpu_check.py --out $OUT/gpu_h200.json
    # then commit the returned JSON as benchmarks/results/gpu_h200.json

    # optional DeepSpeed section: wheels made here into the git-ignored /wheels/ folder, matching
    # the lent machine's Python (PY=3.12 below is an example; check it first with a 1 s run).
    # DeepSpeed is an sdist on PyPI: build its pure-Python wheel here, with no op compiled.
    DS_BUILD_OPS=0 pip wheel --no-deps --no-build-isolation -w wheels deepspeed==0.19.8
    pip download --no-deps --only-binary=:all: --python-version $PY --platform manylinux2014_x86_64 \
        -d wheels hjson ninja py-cpuinfo msgpack einops psutil tqdm packaging pydantic pydantic-core \
        annotated-types typing-inspection typing-extensions pyyaml numpy   # ~25 MiB in all
    # there (run tool: carry=["wheels"]), before the script (not yet exercised on a lease):
    pip install --no-index --find-links wheels deepspeed pydantic pyyaml

    python benchmarks/gpu_check.py --dry-run --out /tmp/gpu_check.json     # CPU, seconds
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pipeline.diffusion import build_schedule, ddim_sample, respace, training_losses  # noqa: E402
from pipeline.models import build_model, count_parameters  # noqa: E402

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "gpu_h200.json"
PEAK_BF16_DENSE = 989e12  # H200 SXM, dense bf16 tensor-core FLOP/s (NVIDIA H200 datasheet)
SECTIONS = ("train", "sample", "deepspeed")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

# preset -> (training batch, sampling batch, schedule, loss settings)
PRESETS: dict[str, dict[str, Any]] = {
    "adm_imagenet64": dict(batch=64, sample_batch=256, schedule="cosine",
                           loss=dict(parameterization="eps", variance="learned_range", loss_type="hybrid")),
    "ddpm_cifar10": dict(batch=128, sample_batch=512, schedule="linear",
                         loss=dict(parameterization="eps", variance="fixed_small", loss_type="simple")),
}
# --dry-run: the same families at toy sizes (CPU, seconds)
DRY_OVERRIDES: dict[str, dict[str, Any]] = {
    "adm_imagenet64": dict(image_size=8, base_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                           attention_resolutions=(4,), num_head_channels=32, num_classes=10),
    "ddpm_cifar10": dict(image_size=8, base_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                         attention_resolutions=(4,)),
}


class Budget:
    """A wall-clock budget for the whole run; each measurement asks for a slice of what is left."""

    def __init__(self, total_s: float):
        self.total_s = total_s
        self.t0 = time.perf_counter()

    def left(self) -> float:
        return self.total_s - (time.perf_counter() - self.t0)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _float_output(net: Callable) -> Callable:
    """The network's output in fp32, so the loss is computed in full precision (as in training)."""
    return lambda x, t, y=None, **kw: net(x, t, y, **kw).float()


def _batch(model: torch.nn.Module, n: int, device: torch.device, channels_last: bool, seed: int = 0):
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(n, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g) * 2 - 1
    x0 = x0.to(device)
    if channels_last:
        x0 = x0.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, cfg.num_classes, (n,), generator=g).to(device) if cfg.num_classes else None
    return x0, y


def loss_fn(net: Callable, schedule, x0: torch.Tensor, y: torch.Tensor | None, loss: dict[str, Any]) -> torch.Tensor:
    t = torch.randint(0, schedule.num_timesteps, (x0.shape[0],), device=x0.device)
    return training_losses(_float_output(net), schedule, x0, t, None, y, **loss).loss.mean()


def count_flops_per_image(model: torch.nn.Module, schedule, loss: dict[str, Any], device: torch.device) -> dict[str, float]:
    """Forward and forward+backward FLOPs per image (FlopCounterMode; matmuls, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    n = 2
    x0, y = _batch(model, n, device, channels_last=False)
    model.zero_grad(set_to_none=True)
    with FlopCounterMode(display=False) as fwd_counter:
        with torch.no_grad():
            t = torch.zeros(n, dtype=torch.long, device=device)
            model(x0, t.float(), y)
    with FlopCounterMode(display=False) as counter:
        loss_fn(model, schedule, x0, y, loss).backward()
    model.zero_grad(set_to_none=True)
    return {"forward": fwd_counter.get_total_flops() / n, "forward_backward": counter.get_total_flops() / n}


def _timed_steps(step: Callable[[], None], device: torch.device, budget_s: float, warmup: int,
                 max_steps: int) -> tuple[int, float, float]:
    """Run ``warmup`` untimed steps (compilation happens here), then steps until ``budget_s`` of
    timed work or ``max_steps``; returns (timed steps, timed seconds, warm-up seconds)."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    _sync(device)
    warm_s = time.perf_counter() - t0
    steps, t1 = 0, time.perf_counter()
    while steps < max_steps:
        step()
        steps += 1
        if steps >= 3 and steps % 2 == 0:
            _sync(device)
            if time.perf_counter() - t1 >= budget_s:
                break
    _sync(device)
    return steps, time.perf_counter() - t1, warm_s


def measure_training(model: torch.nn.Module, schedule, loss: dict[str, Any], device: torch.device, *,
                     precision: str, compile: bool, channels_last: bool, batch: int, time_s: float,
                     max_steps: int, warmup: int, compile_backend: str, flops_per_image: float) -> dict[str, Any]:
    dtype = PRECISIONS[precision]
    model.set_channels_last(channels_last)
    model.train()
    net: Callable = model
    if compile:
        torch._dynamo.reset()
        net = torch.compile(model, backend=compile_backend)
    # fused: one kernel for the whole AdamW update (CUDA; also implemented on CPU, so --dry-run
    # runs the same optimizer path)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, fused=True)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    x0, y = _batch(model, batch, device, channels_last)

    def step() -> None:
        with _autocast(device, dtype):
            value = loss_fn(net, schedule, x0, y, loss)
        if scaler is not None:
            scaler.scale(value).backward()
            scaler.step(opt)
            scaler.update()
        else:
            value.backward()
            opt.step()
        opt.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    steps, seconds, warm_s = _timed_steps(step, device, time_s, warmup=warmup, max_steps=max_steps)
    ips = steps * batch / seconds
    out = {"images_per_s": ips, "step_ms": 1e3 * seconds / steps, "steps": steps,
           "warmup_s": warm_s, "mfu": flops_per_image * ips / PEAK_BF16_DENSE,
           "peak_memory_gib": _peak_gib(device)}
    model.zero_grad(set_to_none=True)
    model.set_channels_last(False)
    return out


def measure_sampling(model: torch.nn.Module, schedule, loss: dict[str, Any], device: torch.device, *,
                     batch: int, steps: int) -> dict[str, Any]:
    """DDIM (eta 0) over ``steps`` respaced steps, bf16 autocast, one seed per image."""
    model.eval()
    cfg = model.config
    y = torch.arange(batch, device=device) % cfg.num_classes if cfg.num_classes else None
    sched = respace(schedule, f"ddim{steps}")
    net = _float_output(model)
    shape = (batch, cfg.in_channels, cfg.image_size, cfg.image_size)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.no_grad(), _autocast(device, torch.bfloat16):
        x = torch.zeros(shape, device=device)
        net(x, torch.zeros(batch, device=device), y)  # warm-up: kernels and autotuning
        _sync(device)
        t0 = time.perf_counter()
        out = ddim_sample(net, sched, shape, seeds=range(batch), y=y, device=device,
                          parameterization=loss["parameterization"], variance=loss["variance"])
        _sync(device)
        seconds = time.perf_counter() - t0
    model.train()
    return {"sampler": f"ddim{steps}", "precision": "bf16", "batch": batch, "seconds": seconds,
            "images_per_s": batch / seconds, "finite": bool(torch.isfinite(out).all()),
            "peak_memory_gib": _peak_gib(device)}


def measure_deepspeed(model: torch.nn.Module, schedule, loss: dict[str, Any], device: torch.device, *,
                      batch: int, time_s: float, max_steps: int, warmup: int, zero_stage: int) -> dict[str, Any]:
    """Our engine (build_engine) in bf16 at world size 1: nccl on a GPU, gloo on CPU."""
    import copy

    from pipeline.config import TrainConfig  # pydantic: only on this optional path
    from pipeline.train.engine import build_engine

    # DeepSpeed re-points parameters into its own buffers: give it a copy, keep ``model`` usable
    model = copy.deepcopy(model)

    tc = TrainConfig(num_workers=1, zero_stage=zero_stage, precision="bf16", micro_batch=batch,
                     grad_clip=1.0, collective_timeout_s=120.0)
    engine = build_engine(model, tc, world_size=1)
    x0, y = _batch(model, batch, device, channels_last=False)
    x0 = x0.to(engine.device)
    y = y.to(engine.device) if y is not None else None

    def step() -> None:
        with _autocast(device, torch.bfloat16):
            value = loss_fn(engine, schedule, x0, y, loss)
        engine.backward(value)
        engine.step()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    steps, seconds, warm_s = _timed_steps(step, device, time_s, warmup=warmup, max_steps=max_steps)
    import torch.distributed as tdist

    backend = tdist.get_backend() if tdist.is_initialized() else None
    out = {"zero_stage": zero_stage, "backend": backend, "world_size": tdist.get_world_size(),
           "images_per_s": steps * batch / seconds, "step_ms": 1e3 * seconds / steps, "steps": steps,
           "warmup_s": warm_s, "peak_memory_gib": _peak_gib(device)}
    return out


def _peak_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def machine(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(),
                            "cpu_count": os.cpu_count(), "device": str(device)}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version(),
                    tf32_matmul=torch.backends.cuda.matmul.allow_tf32, tf32_cudnn=torch.backends.cudnn.allow_tf32)
    return info


def plan(presets: list[str], sections: list[str], deepspeed: bool) -> list[tuple]:
    """Measurements in priority order: what a short lease must not miss comes first."""
    train = lambda p, prec, comp, cl: ("train", p, dict(precision=prec, compile=comp, channels_last=cl))  # noqa: E731
    items: list[tuple] = []
    for p in presets:
        items.append(("flops", p, {}))
        if "train" in sections:
            items += [train(p, "bf16", False, False), train(p, "bf16", False, True),
                      train(p, "fp32", False, False), train(p, "fp16", False, False)]
        if "sample" in sections:
            items.append(("sample", p, {}))
    if "train" in sections:
        items += [train(p, "bf16", True, True) for p in presets]
    if deepspeed and "deepspeed" in sections:
        items += [("deepspeed", presets[0], dict(zero_stage=0)), ("deepspeed", presets[0], dict(zero_stage=2))]
    if "train" in sections:
        for prec, comp, cl in [("fp16", False, True), ("fp32", False, True), ("bf16", True, False),
                               ("fp16", True, True), ("fp32", True, True), ("fp16", True, False),
                               ("fp32", True, False)]:
            items += [train(p, prec, comp, cl) for p in presets]
    return items


def run(args: argparse.Namespace) -> dict[str, Any]:
    dry = args.dry_run
    device = torch.device("cpu") if dry else torch.device("cuda")
    if not dry and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device; use --dry-run to check the script on CPU")
    torch.backends.cudnn.benchmark = True
    budget = Budget(args.budget_s)
    train_s = 0.05 if dry else args.train_s
    max_steps, warmup = (1, 1) if dry else (10_000, 2)
    backend = "eager" if dry else "inductor"
    compile_estimate_s = 5.0 if dry else 150.0  # before the first compile of a preset is measured
    result: dict[str, Any] = {
        "benchmark": "benchmarks/gpu_check.py", "dry_run": dry, "machine": machine(device),
        "peak_flops": PEAK_BF16_DENSE, "peak_flops_note": "H200 dense bf16; MFU of every precision uses it",
        "budget_s": args.budget_s, "compile_backend": backend, "presets": {}, "deepspeed": {},
    }

    def save() -> None:
        result["elapsed_s"] = budget.elapsed()
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2, default=str) + "\n")

    ds_reason = None
    try:
        import deepspeed  # noqa: F401
        import pydantic  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        ds_reason = f"deepspeed/pydantic not importable: {type(e).__name__}: {e}"
    if "deepspeed" not in args.sections:
        ds_reason = f"not in --sections {args.sections}"
    if ds_reason:
        result["deepspeed"] = {"status": "skipped", "reason": ds_reason}

    models: dict[str, torch.nn.Module] = {}
    state: dict[str, dict[str, Any]] = {}
    for name in args.presets:
        torch.manual_seed(0)
        overrides = DRY_OVERRIDES[name] if dry else {}
        model = build_model(name, **overrides).to(device)
        spec = PRESETS[name]
        sched = build_schedule(spec["schedule"], 1000)
        batch = 4 if dry else spec["batch"]
        models[name] = model
        state[name] = dict(schedule=sched, loss=spec["loss"], batch=batch, flops=None, compile_s=None)
        result["presets"][name] = {"parameters": count_parameters(model), "overrides": overrides,
                                   "train_batch": batch, "loss": spec["loss"], "train": [], "sampling": None}
    save()

    for kind, name, opts in plan(args.presets, args.sections, ds_reason is None):
        model, st, rec = models[name], state[name], result["presets"][name]
        needed = 2.0 if dry else 15.0
        if opts.get("compile"):
            needed += st["compile_s"] or compile_estimate_s
        entry: dict[str, Any] = dict(opts)
        if budget.left() < needed:
            entry.update(status="skipped", reason=f"budget: {budget.left():.0f} s left, needs about {needed:.0f} s")
        else:
            try:
                if kind == "flops":
                    st["flops"] = count_flops_per_image(model, st["schedule"], st["loss"], device)
                    rec["flops_per_image"] = st["flops"]
                    continue
                if kind == "train":
                    entry.update(measure_training(
                        model, st["schedule"], st["loss"], device, batch=st["batch"], time_s=train_s,
                        max_steps=max_steps, warmup=warmup, compile_backend=backend,
                        flops_per_image=st["flops"]["forward_backward"], **opts))
                    if opts["compile"]:
                        st["compile_s"] = entry["warmup_s"]
                elif kind == "sample":
                    entry.update(measure_sampling(model, st["schedule"], st["loss"], device,
                                                  batch=4 if dry else PRESETS[name]["sample_batch"],
                                                  steps=3 if dry else 50))
                elif kind == "deepspeed":
                    entry.update(measure_deepspeed(model, st["schedule"], st["loss"], device, batch=st["batch"],
                                                   time_s=train_s, max_steps=max_steps, warmup=warmup, **opts))
                entry["status"] = "ok"
            except Exception as e:  # noqa: BLE001 - one failed variant must not lose the others
                entry.update(status="error", reason=f"{type(e).__name__}: {e}",
                             traceback=traceback.format_exc(limit=3))
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        if kind == "train":
            rec["train"].append(entry)
        elif kind == "sample":
            rec["sampling"] = entry
        elif kind == "deepspeed":
            result["deepspeed"].setdefault("runs", []).append({"preset": name, **entry})
            result["deepspeed"]["status"] = "ran"
        save()
    _summarise(result)
    save()
    return result


def _summarise(result: dict[str, Any]) -> None:
    """Best variant per preset, and the DeepSpeed engine against the bare eager bf16 step."""
    for name, rec in result["presets"].items():
        ok = [e for e in rec["train"] if e.get("status") == "ok"]
        if ok:
            best = max(ok, key=lambda e: e["images_per_s"])
            rec["best"] = {k: best[k] for k in ("precision", "compile", "channels_last", "images_per_s", "mfu")}
    runs = result["deepspeed"].get("runs", [])
    for r in runs:
        bare = [e for e in result["presets"][r["preset"]]["train"] if e.get("status") == "ok"
                and (e["precision"], e["compile"], e["channels_last"]) == ("bf16", False, False)]
        if r.get("status") == "ok" and bare:
            r["engine_over_bare"] = r["images_per_s"] / bare[0]["images_per_s"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny networks, seconds: checks the script")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help=f"JSON path (default {DEFAULT_OUT})")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="wall-clock budget of the whole run (default 450 s; 3600 s with --dry-run, so a loaded "
                         "CPU never skips a variant)")
    ap.add_argument("--train-s", type=float, default=6.0, help="timed seconds per training variant")
    ap.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    ap.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS),
                    help="what to measure (default: all); FLOPs per image are always counted")
    args = ap.parse_args(argv)
    if args.budget_s is None:
        args.budget_s = 3600.0 if args.dry_run else 450.0
    if not (args.budget_s > 0 and math.isfinite(args.budget_s)):
        ap.error(f"--budget-s: {args.budget_s} is not allowed; expected a positive number of seconds")
    if not args.train_s > 0:
        ap.error(f"--train-s: {args.train_s} is not allowed; expected a positive number of seconds")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    for name, rec in result["presets"].items():
        for e in rec["train"]:
            tag = f"{e['precision']}{'+compile' if e['compile'] else ''}{'+cl' if e['channels_last'] else ''}"
            if e.get("status") == "ok":
                print(f"{name:16s} train {tag:22s} {e['images_per_s']:9.1f} img/s  MFU {100 * e['mfu']:5.1f}%")
            else:
                print(f"{name:16s} train {tag:22s} {e['status']}: {e.get('reason')}")
        s = rec.get("sampling") or {}
        print(f"{name:16s} sample {s.get('sampler')} {s.get('images_per_s')} img/s ({s.get('status')})")
    print(f"deepspeed: {json.dumps(result['deepspeed'], default=str)[:400]}")
    print(f"wrote {args.out} in {result['elapsed_s']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
