"""Evaluate a run's checkpoints: distributed sampling, FID / sFID / IS / precision-recall / KID / FD-DINOv2, bits/dim.

    python launch/evaluate.py --run RUN [--checkpoint latest|IMAGES] [--ema RATE] [--num-samples N]
                              [--sampler NAME --steps S] [--guidance-scale W]
                              [--classifier-run RUN --classifier-scale S] [--workers W] [--watch [--once]]
                              [--inception-weights PATH] [--feature-extractor NAME] [--dinov2-weights PATH]
                              [--metrics fid,sfid,is,pr,kid,fd_dinov2,bpd] [--seeds 0,1,2] [key=value ...]

Reads the resolved ``<run>/config.yaml`` that training saved (or ``--config``), applies the
flags and dotted overrides (``eval.kid_subset_size=500``), and writes
``<run>/eval/<checkpoint>/<name>/metrics.json``. ``--watch`` evaluates every committed checkpoint
once and keeps polling for new ones (``--once``: stop when none is pending). ``--posthoc-sigma
0.05,0.07,0.10,0.13`` evaluates the post-hoc EMA (EDM2) of each relative length at ``--checkpoint``
images (default: the run's last ``posthoc_ema`` snapshot), one metrics.json each, and plots the
metrics against sigma_rel in ``<run>/eval/<images seen>/posthoc_sweep.png``. ``--seeds 0,1,2``
evaluates one checkpoint once per seed set and writes each metric's spread (mean, std) beside
them. FID, sFID, precision, recall, KID and FD-DINOv2 come with percentile bootstrap intervals
(``eval.bootstrap_resamples``, ``eval.bootstrap_level``, ``eval.bootstrap_seed``). Without an address
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
    "dinov2_weights": "eval.dinov2_weights",
    "bootstrap_resamples": "eval.bootstrap_resamples",
    "poll_s": "eval.poll_s",
    "guidance_scale": "eval.guidance_scale",
    "classifier_run": "eval.classifier_run",
    "classifier_scale": "eval.classifier_scale",
    "classifier_checkpoint": "eval.classifier_checkpoint",
    "class_label": "eval.class_label",
    "upsampler_run": "eval.upsampler_run",
    "upsampler_checkpoint": "eval.upsampler_checkpoint",
    "upsampler_ema": "eval.upsampler_ema_rate",
    "upsampler_sampler": "eval.upsampler_sampler",
    "upsampler_steps": "eval.upsampler_steps",
    "upsampler_noise_level": "eval.upsampler_noise_level",
    "prior_run": "eval.prior_run",
    "prior_checkpoint": "eval.prior_checkpoint",
    "prior_steps": "eval.prior_steps",
    "prior_guidance": "eval.prior_guidance_scale",
    "clip_model": "eval.clip_model",
    "clip_weights": "eval.clip_weights",
    "prompts_url": "eval.prompts_url",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from pipeline.diffusion.registry import describe_samplers

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run directory (local path or s3://bucket/prefix)")
    p.add_argument("--config", help="config YAML (default: <run>/config.yaml)")
    p.add_argument("--checkpoint", default="latest", help="'latest' or the images seen of a committed checkpoint")
    p.add_argument("--ema", type=float, help="EMA rate to evaluate (default: the checkpoint's first)")
    p.add_argument("--posthoc-sigma", help="comma list of post-hoc EMA lengths sigma_rel in (0, 0.2887) to sweep, "
                                           "e.g. 0.05,0.07,0.10,0.13 (needs train.posthoc_ema snapshots)")
    p.add_argument("--num-samples", type=int, help="number of samples N")
    p.add_argument("--sampler", help=f"a sampler of the run's objective; by objective: {describe_samplers()}")
    p.add_argument("--steps", type=int, help="sampling steps")
    p.add_argument("--eta", type=float, help="DDIM eta")
    p.add_argument("--guidance-scale", type=float, help="classifier-free guidance weight w >= 0 (0: conditional)")
    p.add_argument("--classifier-run", help="run directory of a noisy classifier, for classifier guidance")
    p.add_argument("--classifier-scale", type=float, help="classifier guidance scale s >= 0 (needs --classifier-run)")
    p.add_argument("--classifier-checkpoint", help="'latest' (default) or the images seen of the classifier's checkpoint")
    p.add_argument("--upsampler-run", help="super-resolution run directory (or export folder): upsample every "
                   "sample (ADM-U cascade) and compute the metrics at its resolution")
    p.add_argument("--upsampler-checkpoint", help="'latest' (default) or the images seen of its checkpoint")
    p.add_argument("--upsampler-ema", type=float, help="its EMA rate (default: the checkpoint's first)")
    p.add_argument("--upsampler-sampler", help="its sampler (default: its objective's default)")
    p.add_argument("--upsampler-steps", type=int, help="its sampling steps (default 50)")
    p.add_argument("--upsampler-noise-level", type=float,
                   help="noise augmentation level of the low-resolution input at sampling (default: the model's)")
    p.add_argument("--prior-run", help="unCLIP: the prior's run directory (or export folder); --run is the decoder, "
                   "sampled from the captions of --prompts-url through the prior")
    p.add_argument("--prior-checkpoint", help="'latest' (default) or the images seen of the prior's checkpoint")
    p.add_argument("--prior-steps", type=int, help="the prior's sampling steps (default 64)")
    p.add_argument("--prior-guidance", type=float, help="the prior's classifier-free guidance weight (default 0)")
    p.add_argument("--clip-model", help="unCLIP: the CLIP model that embedded the data (e.g. shapes-tiny)")
    p.add_argument("--clip-weights", help="unCLIP: its weights file (local or s3://)")
    p.add_argument("--prompts-url", help="unCLIP: dataset whose captions are the prompts (default: the reference data)")
    p.add_argument("--class-label", type=int, help="class of every sample (default: drawn from each sample's seed)")
    p.add_argument("--seed", type=int, help="evaluation seed (sample i uses a seed from (seed, i))")
    p.add_argument("--workers", type=int, help="sampling / feature actors")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--name", help="evaluation folder name (default: derived from the settings)")
    p.add_argument("--metrics", help="comma list of fid,sfid,is,pr,kid,fd_dinov2,bpd,probe,clip_score")
    p.add_argument("--feature-extractor", help="inception-v3-compat (default) or inception-v3-tf-torchscript")
    p.add_argument("--inception-weights", help="local Inception weights file (offline clusters)")
    p.add_argument("--dinov2-weights", help="local DINOv2 ViT-L/14 weights (timm safetensors or torch hub .pth), "
                   "for fd_dinov2")
    p.add_argument("--bootstrap-resamples", type=int, help="bootstrap resamples for the intervals (0: none)")
    p.add_argument("--seeds", help="comma list of evaluation seeds: evaluate each seed set, report their spread")
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
    from evaluation.inception import MissingWeightsError
    from evaluation.scoring import resolve_sources
    from evaluation.seed_sets import evaluate_seed_sets, parse_seeds
    from pipeline.train.checkpoint import resolve_checkpoint
    from pipeline.train.ray_launch import init_ray

    progress = not args.no_progress
    try:
        sigmas = _posthoc_sigmas(args)
        if sigmas:
            from evaluation.evaluate import evaluate_posthoc_sweep
            from pipeline.posthoc import posthoc_plan

            if args.watch:
                raise ValueError("--posthoc-sigma and --watch: a sweep evaluates one time; drop --watch")
            for s in sigmas:  # bad lengths, no snapshots, a time past the last snapshot: before Ray starts
                posthoc_plan(args.run, s, args.checkpoint)
        resolve_sources(cfg.eval)  # fail on missing weights before starting anything
        seeds = parse_seeds(args.seeds) if args.seeds is not None else None
        if seeds is not None and (args.watch or args.seed is not None or sigmas):
            raise ValueError("--seeds: not allowed with --watch, --seed or --posthoc-sigma")
        if not args.watch and not sigmas:
            resolve_checkpoint(args.run, args.checkpoint)  # a wrong --checkpoint fails before Ray starts
        # a prior, CLIP model, prompt set or second stage that does not fit fails before Ray starts
        if cfg.eval.prior_run:
            from evaluation.evaluate import unclip_parts

            unclip_parts(cfg)
        if cfg.eval.upsampler_run:
            from evaluation.evaluate import upsampler_parts

            upsampler_parts(cfg)
        init_ray(cfg, address=args.address)
        if sigmas:
            results, plot = evaluate_posthoc_sweep(cfg, args.run, sigmas, args.checkpoint, progress=progress)
            for result in results:
                _print_result(result)
            print(f"written: {plot}", flush=True)
        elif args.watch:
            results = watch(cfg, args.run, once=args.once, progress=progress, on_result=_print_result)
            print(f"evaluated {len(results)} checkpoint(s)")
        elif seeds is not None:
            results, summary, url = evaluate_seed_sets(cfg, args.run, args.checkpoint, seeds, progress=progress)
            for result in results:
                _print_result(result)
            _print_spread(summary, url)
        else:
            _print_result(evaluate_checkpoint(cfg, args.run, args.checkpoint, progress=progress))
    except MissingWeightsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished sample shards are kept and the next run resumes", file=sys.stderr)
        return 130
    return 0


def _posthoc_sigmas(args: argparse.Namespace) -> list[float]:
    from pipeline.diffusion.phema import check_sigma_rel

    if args.posthoc_sigma is None:
        return []
    values = [v.strip() for v in args.posthoc_sigma.split(",") if v.strip()]
    if not values:
        raise ValueError(f"--posthoc-sigma: {args.posthoc_sigma!r} lists no value; give e.g. 0.05,0.07,0.10,0.13")
    return [check_sigma_rel(v, "--posthoc-sigma") for v in values]


def _print_result(result) -> None:
    record = result.record
    extractor = record["feature_extractor"] or {}
    posthoc = record.get("posthoc_ema")
    ema = f"post-hoc EMA sigma_rel {posthoc['sigma_rel']:g}" if posthoc else f"EMA {record['ema_rate']}"
    print(f"checkpoint {record['checkpoint']['name']} ({record['checkpoint']['images_seen']} images), "
          f"{ema}, {record['name']}")
    if extractor:
        print(f"feature extractor: {extractor['feature_extractor']} ({extractor['weights_origin']}: "
              f"{extractor['weights_path']})")
    print(json.dumps(record["metrics"], indent=2, sort_keys=True))
    for metric, iv in sorted((record.get("intervals") or {}).items()):
        print(f"{metric}: {record['metrics'].get(metric, float('nan')):.6g}, {100 * iv['level']:g}% interval "
              f"[{iv['low']:.6g}, {iv['high']:.6g}] ({iv['resamples']} bootstrap resamples of the generated set)")
    for metric, why in record["skipped"].items():
        print(f"skipped {metric}: {why}")
    print(f"written: {result.url}/metrics.json", flush=True)


def _print_spread(summary, url: str) -> None:
    print(f"over seed sets {summary['seeds']}:")
    for metric, s in summary["spread"].items():
        print(f"  {metric}: mean {s['mean']:.6g}, std {s['std']:.6g}, values {[round(v, 6) for v in s['values']]}")
    print(f"written: {url}", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
