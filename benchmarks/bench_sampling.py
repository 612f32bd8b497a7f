"""Sampling throughput: our DDIM-50 / DDPM-250 against diffusers' scheduler loops, same network.

diffusers' side is its documented loop (``scheduler.set_timesteps(n)``; for each ``t``:
``unet(x, t).sample`` then ``scheduler.step(...)``) with ``DDIMScheduler`` / ``DDPMScheduler``,
driving ``UNet2DModel`` holding the same weights as our U-Net (``pipeline.diffusers_export``).
Both sides seed every sample separately (ours: ``noise_from_seeds``; diffusers: one
``torch.Generator`` per sample, its ``randn_tensor`` list form), so the per-sample seeding cost
is on both sides. Timesteps are the same set (DDIM's even stride, diffusers' "leading" spacing).
Before timing, DDIM-50 of both is run from the same x_T and the largest pixel difference is
recorded: the two loops compute the same images, so the ratio compares like with like.

Each repetition runs every (case, implementation) pair in turn, ABBA order, so both are measured
interleaved under the same machine load; the JSON reports median images/s and ours/diffusers, by
wall clock and per CPU-second (one thread: the work done, steadier on a shared machine).

    .venv/bin/python benchmarks/bench_sampling.py            # writes benchmarks/results/sampling_cpu.json
    .venv/bin/python benchmarks/bench_sampling.py --cases tiny:ddim50:16 --reps 3

diffusers is a benchmark-only dependency (the ``bench`` extra); the library never imports it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.bench_unet import _loadavg, cpu_model  # noqa: E402
from pipeline.diffusion import build_schedule, ddim_sample, ddpm_sample, respace  # noqa: E402
from pipeline.models import build_model, count_parameters  # noqa: E402

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "sampling_cpu.json"
DEFAULT_CASES = "tiny:ddim50:8,tiny:ddpm250:4"  # the ddpm_cifar10 network: --cases ddpm_cifar10:ddim50:2
SAMPLERS = {"ddim50": ("ddim", 50), "ddpm250": ("ddpm", 250)}


def parse_cases(text: str) -> list[tuple[str, str, int]]:
    cases = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        parts = item.split(":")
        if len(parts) != 3 or parts[1] not in SAMPLERS or not parts[2].isdigit() or int(parts[2]) < 1:
            raise ValueError(f"--cases: {item!r} is not allowed; expected PRESET:SAMPLER:BATCH with SAMPLER in "
                             f"{sorted(SAMPLERS)} and BATCH >= 1, e.g. tiny:ddim50:16")
        cases.append((parts[0], parts[1], int(parts[2])))
    if not cases:
        raise ValueError("--cases: empty; give at least one PRESET:SAMPLER:BATCH")
    return cases


def diffusers_scheduler(kind: str, betas: torch.Tensor):
    from diffusers import DDIMScheduler, DDPMScheduler

    common = dict(num_train_timesteps=len(betas), trained_betas=[float(b) for b in betas], clip_sample=True,
                  clip_sample_range=1.0, prediction_type="epsilon", timestep_spacing="leading", steps_offset=0)
    if kind == "ddim":
        return DDIMScheduler(set_alpha_to_one=True, **common)
    return DDPMScheduler(variance_type="fixed_small", **common)


def ours_sampler(model: torch.nn.Module, kind: str, steps: int, schedule, batch: int,
                 x_T: torch.Tensor | None = None) -> Callable[[], torch.Tensor]:
    shape = (batch, 3, model.config.image_size, model.config.image_size)
    sched = respace(schedule, f"ddim{steps}")  # DDIM's even stride: the set diffusers' "leading" spacing picks
    fn = ddim_sample if kind == "ddim" else ddpm_sample

    def run() -> torch.Tensor:
        with torch.inference_mode():
            return fn(model, sched, shape, seeds=range(batch), x_T=x_T)

    return run


def diffusers_sampler(unet: torch.nn.Module, kind: str, steps: int, betas: torch.Tensor, batch: int,
                      x_T: torch.Tensor | None = None) -> Callable[[], torch.Tensor]:
    from diffusers.utils.torch_utils import randn_tensor

    scheduler = diffusers_scheduler(kind, betas)
    size = unet.config.sample_size
    shape = (batch, unet.config.in_channels, size, size)

    def run() -> torch.Tensor:
        gens = [torch.Generator().manual_seed(i) for i in range(batch)]  # one stream per sample
        with torch.inference_mode():
            x = randn_tensor(shape, generator=gens) if x_T is None else x_T.clone()
            scheduler.set_timesteps(steps)
            for t in scheduler.timesteps:
                eps = unet(x, t).sample
                kw = {"eta": 0.0} if kind == "ddim" else {}
                x = scheduler.step(eps, t, x, generator=gens, **kw).prev_sample
        return x

    return run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=DEFAULT_CASES, help=f"PRESET:SAMPLER:BATCH list (default {DEFAULT_CASES})")
    ap.add_argument("--reps", type=int, default=7, help="timed repetitions (median reported)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: steady on a shared machine)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    try:
        cases = parse_cases(args.cases)
    except ValueError as e:
        ap.error(str(e))
    if args.reps < 1:
        ap.error(f"--reps: {args.reps} is not allowed; expected >= 1")
    try:
        import diffusers
    except ImportError:
        print("error: diffusers is not installed; `pip install -e '.[bench]'`", file=sys.stderr)
        return 2
    from pipeline.diffusers_export import build_diffusers_unet

    torch.set_num_threads(args.threads)
    schedule = build_schedule("linear", 1000)
    nets: dict[str, tuple[torch.nn.Module, torch.nn.Module]] = {}
    parity: dict[str, float] = {}
    for preset in dict.fromkeys(c[0] for c in cases):
        torch.manual_seed(0)
        ours = build_model(preset).eval()
        theirs = build_diffusers_unet(ours.state_dict(), ours.config)
        nets[preset] = (ours, theirs)
        # same x_T, DDIM-50: both loops must make the same images
        x_T = torch.randn(2, 3, ours.config.image_size, ours.config.image_size, generator=torch.Generator().manual_seed(1))
        a = ours_sampler(ours, "ddim", 50, schedule, 2, x_T)()
        b = diffusers_sampler(theirs, "ddim", 50, schedule.betas, 2, x_T)()
        parity[preset] = float((a - b).abs().max())
        print(f"{preset}: DDIM-50 from one x_T, max |ours - diffusers| = {parity[preset]:.2e}")

    runs: dict[tuple[str, str], Callable[[], torch.Tensor]] = {}
    for preset, sampler, batch in cases:
        kind, steps = SAMPLERS[sampler]
        ours, theirs = nets[preset]
        key = f"{preset}:{sampler}:{batch}"
        runs[(key, "ours")] = ours_sampler(ours, kind, steps, schedule, batch)
        runs[(key, "diffusers")] = diffusers_sampler(theirs, kind, steps, schedule.betas, batch)
    load_at_start = _loadavg()
    for run in runs.values():  # warm-up
        run()
    ips: dict[tuple[str, str], list[float]] = {k: [] for k in runs}
    cpu: dict[tuple[str, str], list[float]] = {k: [] for k in runs}
    for rep in range(args.reps):
        keys = list(runs) if rep % 2 == 0 else list(reversed(runs))
        for key in keys:
            batch = int(key[0].rsplit(":", 1)[1])
            t0, c0 = time.perf_counter(), time.process_time()
            runs[key]()
            ips[key].append(batch / (time.perf_counter() - t0))
            cpu[key].append(batch / max(time.process_time() - c0, 1e-9))

    results = {}
    for preset, sampler, batch in cases:
        key = f"{preset}:{sampler}:{batch}"
        o, d = ips[(key, "ours")], ips[(key, "diffusers")]
        oc, dc = cpu[(key, "ours")], cpu[(key, "diffusers")]
        results[key] = {
            "preset": preset, "sampler": sampler, "batch": batch,
            "ours_images_per_s": round(statistics.median(o), 4),
            "diffusers_images_per_s": round(statistics.median(d), 4),
            "ratio_ours_over_diffusers": round(statistics.median(o) / statistics.median(d), 3),
            "median_paired_ratio": round(statistics.median(a / b for a, b in zip(o, d)), 3),
            # one thread: CPU time is the work done, less sensitive to other jobs on a shared machine
            "ratio_ours_over_diffusers_cpu_time": round(statistics.median(oc) / statistics.median(dc), 3),
            "median_paired_ratio_cpu_time": round(statistics.median(a / b for a, b in zip(oc, dc)), 3),
            "ours_samples": [round(v, 4) for v in o], "diffusers_samples": [round(v, 4) for v in d],
            "ours_images_per_cpu_s": [round(v, 4) for v in oc], "diffusers_images_per_cpu_s": [round(v, 4) for v in dc],
        }
        r = results[key]
        print(f"{key}: ours {r['ours_images_per_s']:.3f} img/s, diffusers {r['diffusers_images_per_s']:.3f} img/s, "
              f"ratio {r['ratio_ours_over_diffusers']:.3f} (paired {r['median_paired_ratio']:.3f}); per CPU-second "
              f"{r['ratio_ours_over_diffusers_cpu_time']:.3f} (paired {r['median_paired_ratio_cpu_time']:.3f})")
    out = {
        "benchmark": "benchmarks/bench_sampling.py",
        "what": "images/s of whole sampling runs (no grad), per-sample seeded noise on both sides",
        "machine": {"cpu": cpu_model(), "torch": torch.__version__, "diffusers": diffusers.__version__,
                    "threads": torch.get_num_threads(), "loadavg_start": load_at_start, "loadavg_end": _loadavg()},
        "reps": args.reps,
        "parameters": {p: count_parameters(n[0]) for p, n in nets.items()},
        "ddim50_same_x_T_max_abs_diff": parity,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
