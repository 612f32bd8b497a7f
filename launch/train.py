"""Train a diffusion model with Ray Train + DeepSpeed.

    python launch/train.py --config configs/quickstart.yaml [key=value ...] [--address ADDR]

Without an address Ray starts in-process on 127.0.0.1; with ``--address``, ``train.ray_address``
or ``RAY_ADDRESS`` it joins a cluster (also under ``ray job submit`` / ``ray submit``).

Exit status: 0 done; 2 bad input, found before Ray starts (config, model preset, URLs, S3
reachability/credentials, data resolution, resumability); 1 training failed (one line: the root
cause); 75 stopped by SIGTERM/SIGINT after committing a checkpoint (run the command again to
resume); 143/130 a second signal or ``train.preemption_grace_s`` ran out (the previous committed
checkpoint is the resume point).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML preset, e.g. configs/quickstart.yaml")
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else in-process Ray)")
    parser.add_argument("--dashboard", action="store_true", help="start the Ray dashboard (127.0.0.1)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=2e-4")
    args = parser.parse_args(argv)

    from pipeline.config import load_config_or_exit
    from pipeline.train.loop import redacted_yaml
    from pipeline.train.preemption import EXIT_PREEMPTED
    from pipeline.train.preflight import check_config_file
    from pipeline.train.ray_launch import TrainingFailed, check_launch, run_training

    try:
        check_config_file(args.config)
        cfg = load_config_or_exit(args.config, args.overrides)
        check_launch(cfg)  # preflight and train.init_from, before Ray starts
    except ValueError as exc:  # PreflightError and the init_from checks: one line naming key and value
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(redacted_yaml(cfg), flush=True)
    try:
        metrics = run_training(cfg, address=args.address, dashboard=args.dashboard)
    except TrainingFailed as exc:
        print(f"error: training failed: {exc}", file=sys.stderr)
        return 1
    run = cfg.train.run_dir
    if metrics.get("preempted"):
        print(f"preempted: checkpoint committed at {metrics.get('images_seen', '?')} images in {run}/checkpoints; "
              f"run the same command again to resume", flush=True)
        return EXIT_PREEMPTED
    print(f"done: {metrics.get('images_seen', '?')} images, {metrics.get('step', '?')} steps")
    print(f"checkpoints: {run}/checkpoints\nlogs:        {run}/logs (TensorBoard, metrics.jsonl)")
    print(f"samples:     {run}/samples/latest.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
