"""Train a diffusion model with Ray Train + DeepSpeed.

    python launch/train.py --config configs/quickstart.yaml [key=value ...] [--address ADDR]

Without an address Ray starts in-process on 127.0.0.1; with ``--address``, ``train.ray_address``
or ``RAY_ADDRESS`` it joins a cluster (also under ``ray job submit`` / ``ray submit``).
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
    from pipeline.train.ray_launch import check_launch, run_training

    cfg = load_config_or_exit(args.config, args.overrides)
    try:
        check_launch(cfg)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(redacted_yaml(cfg), flush=True)
    metrics = run_training(cfg, address=args.address, dashboard=args.dashboard)
    run = cfg.train.run_dir
    print(f"done: {metrics.get('images_seen', '?')} images, {metrics.get('step', '?')} steps")
    print(f"checkpoints: {run}/checkpoints\nlogs:        {run}/logs (TensorBoard, metrics.jsonl)")
    print(f"samples:     {run}/samples/latest.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
