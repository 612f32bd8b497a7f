"""Forward+backward throughput of the ddpm_cifar10 U-Net: ours vs diffusers' UNet2DModel.

Both networks are the DDPM CIFAR-10 model (Ho et al. 2020): 128 channels, multipliers 1,2,2,2,
2 residual blocks per level, single-head attention at 16x16, dropout 0.1 (same parameter count,
checked below).  Each repetition times ``--iters`` training steps (forward, mean-squared loss,
backward) of every (precision, implementation) pair in turn, so the two implementations are
measured interleaved in the same run under the same machine load; the JSON reports the median
images/s (wall clock) and images per CPU-second over repetitions, and the ratios ours / diffusers.

    .venv/bin/python benchmarks/bench_unet.py                  # writes benchmarks/results/unet_cpu.json
    .venv/bin/python benchmarks/bench_unet.py --threads 1      # shared machine: steadier numbers
    .venv/bin/python benchmarks/bench_unet.py --profile        # print torch.profiler tables and exit

diffusers is a benchmark-only dependency (the ``bench`` extra); the library never imports it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from pipeline.models import build_model, count_parameters

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "unet_cpu.json"


def diffusers_ddpm_cifar10(dropout: float) -> torch.nn.Module:
    """diffusers' UNet2DModel configured as the DDPM CIFAR-10 network (google/ddpm-cifar10-32)."""
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(128, 256, 256, 256),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=None,  # one head, as in DDPM
        norm_num_groups=32,
        dropout=dropout,
        time_embedding_type="positional",
        flip_sin_to_cos=False,
        freq_shift=1,
        downsample_padding=0,
        resnet_time_scale_shift="default",
    )


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def make_step(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, dtype: torch.dtype | None, is_ours: bool):
    def step() -> None:
        ctx = torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext()
        with ctx:
            out = model(x, t) if is_ours else model(x, t).sample
            loss = out.float().square().mean()
        loss.backward()
        for p in model.parameters():
            p.grad = None

    return step


def profile(steps: dict[tuple[str, str], object], rows: int) -> None:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    for key, step in steps.items():
        step()
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        print(f"==== {key[0]} / {key[1]}")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--iters", type=int, default=1, help="training steps per timed repetition")
    ap.add_argument("--reps", type=int, default=15, help="timed repetitions (median reported)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch intra-op threads (0: torch default). On a machine shared with other jobs, 1 thread "
        "gives stable numbers: several threads stall on each other's barriers when cores are taken.",
    )
    ap.add_argument("--channels-last", action="store_true", help="run both networks in channels-last format")
    ap.add_argument("--profile", action="store_true", help="print torch.profiler tables and exit")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    for name in ("batch", "iters", "reps"):
        if getattr(args, name) < 1:
            ap.error(f"--{name}: {getattr(args, name)} is not allowed; expected >= 1")
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    dtypes = {"fp32": None, "bf16": torch.bfloat16}
    for p in precisions:
        if p not in dtypes:
            ap.error(f"--precisions: {p!r} is not allowed; choose from {', '.join(dtypes)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        import diffusers
    except ImportError:
        print("error: diffusers is not installed; `pip install -e '.[bench]'`", file=sys.stderr)
        return 2

    torch.manual_seed(0)
    ours = build_model("ddpm_cifar10").train()
    theirs = diffusers_ddpm_cifar10(dropout=ours.config.dropout).train()
    n_ours, n_theirs = count_parameters(ours), count_parameters(theirs)
    if abs(n_ours - n_theirs) > 1e-3 * n_ours:
        print(f"error: the networks differ: ours {n_ours} parameters, diffusers {n_theirs}", file=sys.stderr)
        return 1
    x = torch.randn(args.batch, 3, 32, 32)
    if args.channels_last:
        ours.set_channels_last(True)
        theirs.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    t = torch.randint(0, 1000, (args.batch,)).float()
    steps = {}
    for p in precisions:
        steps[(p, "ours")] = make_step(ours, x, t, dtypes[p], True)
        steps[(p, "diffusers")] = make_step(theirs, x, t, dtypes[p], False)
    if args.profile:
        profile(steps, rows=25)
        return 0

    load_at_start = _loadavg()
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    wall: dict[tuple[str, str], list[float]] = {k: [] for k in steps}
    cpu: dict[tuple[str, str], list[float]] = {k: [] for k in steps}
    for rep in range(args.reps):
        keys = list(steps) if rep % 2 == 0 else list(reversed(steps))  # ABBA order
        for key in keys:
            w0, c0 = time.perf_counter(), time.process_time()
            for _ in range(args.iters):
                steps[key]()
            n = args.batch * args.iters
            wall[key].append(n / (time.perf_counter() - w0))
            cpu[key].append(n / max(time.process_time() - c0, 1e-9))

    def summary(ours_s: list[float], theirs_s: list[float]) -> dict:
        paired = [a / b for a, b in zip(ours_s, theirs_s)]
        med_o, med_t = statistics.median(ours_s), statistics.median(theirs_s)
        return {
            "ours": round(med_o, 3),
            "diffusers": round(med_t, 3),
            "ratio_of_medians": round(med_o / med_t, 3),
            "median_paired_ratio": round(statistics.median(paired), 3),
            "ours_samples": [round(v, 3) for v in ours_s],
            "diffusers_samples": [round(v, 3) for v in theirs_s],
        }

    results = {}
    for p in precisions:
        k_o, k_t = (p, "ours"), (p, "diffusers")
        by_wall, by_cpu = summary(wall[k_o], wall[k_t]), summary(cpu[k_o], cpu[k_t])
        results[p] = {
            "ours_images_per_s": by_wall["ours"],
            "diffusers_images_per_s": by_wall["diffusers"],
            "ratio_ours_over_diffusers_wall_clock": by_wall["ratio_of_medians"],
            "ratio_ours_over_diffusers_cpu_time": by_cpu["ratio_of_medians"],
            "wall_clock_images_per_s": by_wall,
            "images_per_cpu_second": by_cpu,
        }
        print(
            f"{p}: ours {by_wall['ours']:.2f} img/s, diffusers {by_wall['diffusers']:.2f} img/s, "
            f"ratio {by_wall['ratio_of_medians']:.3f} (paired {by_wall['median_paired_ratio']:.3f}); "
            f"per CPU-second ratio {by_cpu['ratio_of_medians']:.3f} (paired {by_cpu['median_paired_ratio']:.3f})"
        )

    report = {
        "benchmark": "ddpm_cifar10 forward+backward (MSE loss), train mode, CPU",
        "batch": args.batch,
        "resolution": 32,
        "iters_per_rep": args.iters,
        "reps": args.reps,
        "warmup": args.warmup,
        "memory_format": "channels_last" if args.channels_last else "contiguous (NCHW)",
        "statistic": (
            "median over repetitions of images/s (wall clock) and of images per CPU-second of this "
            "process; ratio_of_medians = median(ours) / median(diffusers); median_paired_ratio = "
            "median over repetitions of ours / diffusers measured back to back in that repetition"
        ),
        "method": (
            "ours and diffusers UNet2DModel measured interleaved in one process and one run "
            "(ABBA order: each repetition runs every (precision, implementation) pair once, the order "
            "reversing between repetitions), so both see the same machine load. The machine may be "
            "shared with other jobs (see load_average): absolute images/s are then noisy and the "
            "ratios are the meaningful numbers; with one intra-op thread, images per CPU-second "
            "excludes the time this process waited for a core and is the steadier comparison."
        ),
        "parameters": {"ours": n_ours, "diffusers": n_theirs},
        "machine": {
            "cpu_model": cpu_model(),
            "logical_cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_average_at_start": load_at_start,
            "load_average_at_end": _loadavg(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
        },
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
