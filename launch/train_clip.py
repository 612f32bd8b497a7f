"""Train the small offline CLIP (open_clip) on a source's image-caption pairs; write its weights.

    python launch/train_clip.py --source builtin:shapes10 --out runs/clip/shapes-tiny.safetensors
    python launch/prepare_data.py --source builtin:shapes10 --out runs/data/unclip --num-samples 20000 \\
        --embed clip --clip-model shapes-tiny --clip-weights runs/clip/shapes-tiny.safetensors

Writes OUT (.safetensors) and OUT's .json (model, config, sha256, held-out text -> image top-1).
The source needs captions (builtin:NAME has them; an image folder needs a .txt beside each image,
an .npz a 'captions' array). Exit status 2 on bad arguments or inputs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from pipeline.data.clip_embed import TINY_MODELS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default="builtin:shapes10", help="a source with captions (default builtin:shapes10)")
    p.add_argument("--out", required=True, help="weights file to write (.safetensors; local or s3://)")
    p.add_argument("--model", default="shapes-tiny", choices=sorted(TINY_MODELS), help="model config (default shapes-tiny)")
    p.add_argument("--num-train", type=int, default=8000, help="training pairs: the source's first N (default 8000)")
    p.add_argument("--num-heldout", type=int, default=1000, help="held-out pairs after them (default 1000)")
    p.add_argument("--steps", type=int, default=800, help="optimizer steps (default 800)")
    p.add_argument("--batch-size", type=int, default=128, help="pairs per step (default 128)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate (default 2e-3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial weights and batches (and of a builtin source)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: fastest for a tiny model)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from pipeline.data import storage
    from pipeline.data.clip_train import save_clip, train_clip
    from pipeline.data.sources import open_source

    try:
        if not args.out.endswith(".safetensors"):
            raise ValueError(f"--out: {args.out!r} is not allowed; the weights file must end in .safetensors")
        source = open_source(args.source, num_samples=args.num_train + args.num_heldout, seed=args.seed)
        result = train_clip(source, args.model, num_train=args.num_train, num_heldout=args.num_heldout,
                            steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                            threads=args.threads)
        record = save_clip(result, args.out, extra={"source": source.describe(), "num_train": args.num_train})
    except (ValueError, FileNotFoundError, storage.StorageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    r = record["heldout_retrieval"]
    print(json.dumps(r))
    print(f"{args.out}: {args.model} (dim {record['dim']}, sha256 {record['weights_sha256'][:12]}) trained in "
          f"{record['seconds']:.0f} s; held-out text -> image top-1 {r['top1']:.3f} (chance {r['chance']:.4f})"
          + (f", class top-1 {r['class_top1']:.3f} (chance {r['class_chance']:.3f})" if "class_top1" in r else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
