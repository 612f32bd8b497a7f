"""Export one EMA of a training checkpoint for serving (no DeepSpeed, Ray or pickle needed to load it).

    python launch/export.py --run RUN [--checkpoint latest|IMAGES] [--ema RATE | --posthoc-sigma S] --out DIR
                            [--format native|diffusers] [--overwrite]

``--posthoc-sigma 0.07`` exports the post-hoc EMA (EDM2) of relative length 0.07, reconstructed from
the run's ``posthoc_ema/`` snapshots at ``--checkpoint`` images (default: the last snapshot).

``native`` writes model.safetensors + config.json + README.md (load with ``pipeline.load_pretrained``);
``diffusers`` writes a DDPMPipeline folder (model_index.json, unet/, scheduler/) + README.md.
RUN and DIR are local paths or s3:// prefixes. Bad input exits with status 2 and a message.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="training run directory (local path or s3://bucket/prefix)")
    p.add_argument("--checkpoint", default="latest", help="'latest' or the images seen of a committed checkpoint")
    p.add_argument("--ema", type=float, help="EMA rate to export (default: the run config's export.ema_rate, "
                                             "else the checkpoint's first)")
    p.add_argument("--posthoc-sigma", type=float,
                   help="export the post-hoc EMA of this relative length sigma_rel in (0, 0.2887) instead of an EMA "
                        "rate (needs train.posthoc_ema snapshots; --checkpoint is then the time in images seen)")
    p.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
    p.add_argument("--format", choices=("native", "diffusers"),
                   help="native (default: the run config's export.format) or diffusers")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export at --out")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    from pipeline.export import export_run

    command = shlex.join(["python", "launch/export.py", *argv])
    try:
        result = export_run(args.run, args.out, checkpoint=args.checkpoint, ema_rate=args.ema, fmt=args.format,
                            overwrite=args.overwrite, command=command, posthoc_sigma=args.posthoc_sigma)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if result.posthoc_sigma is not None:
        print(f"exported the post-hoc EMA sigma_rel {result.posthoc_sigma:g} at {result.images_seen} images "
              f"({result.format}) to {result.path}:")
    else:
        print(f"exported EMA {result.ema_rate:g} of checkpoint {result.images_seen} ({result.format}) to {result.path}:")
    for name in result.files:
        print(f"  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
