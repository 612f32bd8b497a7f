"""Evaluate a run's checkpoints: distributed sampling, FID / IS / precision-recall / KID, bits/dim.

    python launch/evaluate.py --run RUN [--checkpoint latest|IMAGES] [--ema RATE] [--num-samples N]
                              [--sampler NAME --steps S] [--guidance-scale W]
                              [--classifier-run RUN --classifier-scale S] [--workers W] [--watch [--once]]
                              [--inception-weights PATH] [--feature-extractor NAME] [key=value ...]

Reads the resolved ``<run>/config.yaml`` that training saved (or ``--config``), applies the
flags and dotted overrides (``eval.kid_subset_size=500``), and writes
``<run>/eval/<checkpoint>/<name>/metrics.json``. ``--watch`` evaluates every committed checkpoint
once and keeps polling for new ones (``--once``: stop when none is pending). Without an address
Ray starts in-process on the loopback address; ``--address`` / ``RAY_ADDRESS`` join a cluster.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

# flag -> dotted config key
_FLAGS = {
    "ema": "eval.ema_rate",
    "num_samples": "eval.num_samples",
    "sampler": "eval.sampler",
    "steps": "eval.steps",
    "eta": "eval.eta",
    "seed": "eval.seed",
    "workers": "eval.num_workers",
    "batch_size": "eval.batch_size",
    "name": "eval.name",
    "metrics": "eval.metrics",
    "feature_extractor": "eval.feature_extractor",
    "inception_weights": "eval.inception_weights",
    "poll_s": "eval.poll_s",
    "guidance_scale": "eval.guidance_scale",
    "classifier_run": "eval.classifier_run",
    "classifier_scale": "eval.classifier_scale",
    "classifier_checkpoint": "eval.classifier_checkpoint",
    "class_label": "eval.class_label",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from pipeline.diffusion.registry import describe_samplers

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run directory (local path or s3://bucket/prefix)")
    p.add_argument("--config", help="config YAML (default: <run>/config.yaml)")
    p.add_argument("--checkpoint", default="latest", help="'latest' or the images seen of a committed checkpoint")
    p.add_argument("--ema", type=float, help="EMA rate to evaluate (default: the checkpoint's first)")
    p.add_argument("--num-samples", type=int, help="number of samples N")
    p.add_argument("--sampler", help=f"a sampler of the run's objective; by objective: {describe_samplers()}")
    p.add_argument("--steps", type=int, help="sampling steps")
    p.add_argument("--eta", type=float, help="DDIM eta")
    p.add_argument("--guidance-scale", type=float, help="classifier-free guidance weight w >= 0 (0: conditional)")
    p.add_argument("--classifier-run", help="run directory of a noisy classifier, for classifier guidance")
    p.add_argument("--classifier-scale", type=float, help="classifier guidance scale s >= 0 (needs --classifier-run)")
    p.add_argument("--classifier-checkpoint", help="'latest' (default) or the images seen of the classifier's checkpoint")
    p.add_argument("--class-label", type=int, help="class of every sample (default: drawn from each sample's seed)")
    p.add_argument("--seed", type=int, help="evaluation seed (sample i uses a seed from (seed, i))")
    p.add_argument("--workers", type=int, help="sampling / feature actors")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--name", help="evaluation folder name (default: derived from the settings)")
    p.add_argument("--metrics", help="comma list of fid,is,pr,kid,bpd,probe")
    p.add_argument("--feature-extractor", help="inception-v3-compat (default) or inception-v3-tf-torchscript")
    p.add_argument("--inception-weights", help="local Inception weights file (offline clusters)")
    p.add_argument("--npz", action="store_true", help="also write samples.npz (openai reference-batch format)")
    p.add_argument("--watch", action="store_true", help="evaluate each newly committed checkpoint once, polling")
    p.add_argument("--once", action="store_true", help="with --watch: stop when nothing is pending")
    p.add_argument("--poll-s", type=float, help="with --watch: seconds between polls")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else in-process Ray)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. eval.kid_subset_size=500")
    return p.parse_args(argv)


def build_overrides(args: argparse.Namespace) -> list[str]:
    out = []
    for flag, key in _FLAGS.items():
        value = getattr(args, flag)
        if value is None:
            continue
        if flag == "metrics":
            value = "[" + ",".join(m.strip() for m in value.split(",") if m.strip()) + "]"
        out.append(f"{key}={value}")
    if args.npz:
        out.append("eval.write_npz=true")
    return out + list(args.overrides)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from pipeline.config import load_config_or_exit
    from pipeline.data import storage

    config = args.config
    if config is None:
        saved = storage.join(args.run, "config.yaml")
        if not storage.exists(saved):
            print(f"error: --run {args.run!r} has no config.yaml; pass --config", file=sys.stderr)
            return 2
        if storage.is_s3(saved):
            local = Path(os.environ.get("TMPDIR", "/tmp")) / f"eval-config-{os.getpid()}.yaml"
            local.write_bytes(storage.read_bytes(saved))
            saved = str(local)
        config = saved
    cfg = load_config_or_exit(config, build_overrides(args))

    from evaluation.evaluate import evaluate_checkpoint, watch
    from evaluation.inception import MissingWeightsError, resolve_feature_extractor
    from pipeline.train.checkpoint import resolve_checkpoint
    from pipeline.train.ray_launch import init_ray

    progress = not args.no_progress
    try:
        if any(m not in ("bpd", "probe") for m in cfg.eval.metrics):  # fail on missing weights before anything
            resolve_feature_extractor(cfg.eval.feature_extractor, cfg.eval.inception_weights,
                                      allow_download=cfg.eval.download_weights,
                                      download_timeout_s=cfg.eval.download_timeout_s)
        if not args.watch:
            resolve_checkpoint(args.run, args.checkpoint)  # a wrong --checkpoint fails before Ray starts
        init_ray(cfg, address=args.address)
        if args.watch:
            results = watch(cfg, args.run, once=args.once, progress=progress, on_result=_print_result)
            print(f"evaluated {len(results)} checkpoint(s)")
        else:
            _print_result(evaluate_checkpoint(cfg, args.run, args.checkpoint, progress=progress))
    except MissingWeightsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished sample shards are kept and the next run resumes", file=sys.stderr)
        return 130
    return 0


def _print_result(result) -> None:
    record = result.record
    extractor = record["feature_extractor"] or {}
    print(f"checkpoint {record['checkpoint']['name']} ({record['checkpoint']['images_seen']} images), "
          f"EMA {record['ema_rate']}, {record['name']}")
    if extractor:
        print(f"feature extractor: {extractor['feature_extractor']} ({extractor['weights_origin']}: "
              f"{extractor['weights_path']})")
    print(json.dumps(record["metrics"], indent=2, sort_keys=True))
    for metric, why in record["skipped"].items():
        print(f"skipped {metric}: {why}")
    print(f"written: {result.url}/metrics.json", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
