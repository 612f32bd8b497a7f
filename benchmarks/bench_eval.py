"""Evaluation sampling throughput on CPU: DDIM-50 samples/s of the quickstart model, 1 vs 2 workers.

The quickstart network (configs/quickstart.yaml: ``tiny`` at 16x16, class-conditional) with its
seeded initial weights (throughput does not depend on training) samples through
``evaluation.sampling.generate_samples`` on the Ray actor pool: shards of samples, one seed per
image, PNG shards written to a temp folder. Workers are started and the model built before
timing (a warm-up pass), then 1-worker and 2-worker runs alternate for each repetition under the
same machine load; the JSON reports median samples/s, the scaling ratio (2 workers / 1 worker;
the ideal on 2 free cores is 2.0) and the load average, since the machine may be shared. The
1- and 2-worker sample sets are also checked to be byte-identical.

    .venv/bin/python benchmarks/bench_eval.py      # writes benchmarks/results/eval_cpu.json
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from evaluation.pool import ensure_ray  # noqa: E402
from evaluation.sampling import generate_samples  # noqa: E402
from pipeline.config import load_config  # noqa: E402

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "eval_cpu.json"


def quickstart_sampler(model_cfg: dict, diffusion_cfg: dict, steps: int):
    """A builder run on each worker: the quickstart network (seeded init) with DDIM-``steps``."""

    def build():
        import torch

        from evaluation.model_sampling import SamplerSettings, make_sample_fn
        from pipeline.config import ModelConfig
        from pipeline.models import build_model_from_config

        torch.manual_seed(0)
        model = build_model_from_config(ModelConfig.model_validate(model_cfg))
        return make_sample_fn(model, SamplerSettings("ddim", steps), schedule=diffusion_cfg["schedule"],
                              timesteps=diffusion_cfg["timesteps"], parameterization=diffusion_cfg["parameterization"],
                              variance=diffusion_cfg["variance"])

    return build


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    args = parser.parse_args()

    cfg = load_config(ROOT / "configs" / "quickstart.yaml")
    builder = quickstart_sampler(cfg.model.model_dump(mode="json"), cfg.diffusion.model_dump(mode="json"), args.steps)
    ensure_ray()
    tmp = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    common = dict(batch_size=args.batch_size, samples_per_shard=args.batch_size, progress=False)
    try:
        generate_samples(builder, str(tmp / "warmup"), 2 * args.batch_size, num_workers=2, **common)
        rates: dict[int, list[float]] = {1: [], 2: []}
        for rep in range(args.repeats):
            for workers in (1, 2):
                out = tmp / f"w{workers}-r{rep}"
                start = time.perf_counter()
                generate_samples(builder, str(out), args.samples, num_workers=workers, **common)
                rates[workers].append(args.samples / (time.perf_counter() - start))
                print(f"repeat {rep} workers {workers}: {rates[workers][-1]:.2f} samples/s", flush=True)
        identical = all(
            (tmp / "w1-r0" / p.name).read_bytes() == p.read_bytes() for p in sorted((tmp / "w2-r0").glob("*.tar"))
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    one, two = statistics.median(rates[1]), statistics.median(rates[2])
    result = {
        "benchmark": "evaluation sampling, DDIM on the quickstart model (configs/quickstart.yaml), CPU",
        "sampler": f"ddim{args.steps}",
        "model": {"preset": cfg.model.preset, **cfg.model.overrides},
        "num_samples": args.samples,
        "batch_size": args.batch_size,
        "samples_per_second": {"1_worker": round(one, 3), "2_workers": round(two, 3)},
        "all_runs": {str(k): [round(v, 3) for v in vs] for k, vs in rates.items()},
        "scaling_ratio_2_over_1": round(two / one, 3),
        "identical_images_1_vs_2_workers": identical,
        "machine": {"cpus": os.cpu_count(), "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
                    "python": platform.python_version(), "platform": platform.platform()},
        "created_unix": int(time.time()),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
