"""Convert images into WebDataset shards + a dataset.json manifest (local folder or s3://).

    python launch/prepare_data.py --source builtin:shapes10 --out runs/data/builtin --num-samples 20000
    python launch/prepare_data.py --source ~/cifar-10-python.tar.gz --out s3://bucket/cifar10 --workers 8

SRC: builtin:NAME | an image folder (one subfolder per class, or flat) | cifar-10-python.tar.gz |
an .npz with arr_0 (N,H,W,C) uint8, optional labels and captions. Captions (builtin generated, an
image's sidecar .txt, an .npz 'captions' array) are stored per sample as txt. With --embed clip,
every sample also gets its CLIP image (and caption) embedding, from a local weights file (train the
small offline one with launch/train_clip.py; nothing is downloaded). Shards are written by Ray tasks (a local
Ray, or the cluster named by RAY_ADDRESS); re-running finishes an interrupted job and does nothing
for a finished one. Exit status 2 on bad arguments or inputs.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", required=True, help="builtin:shapes10, an image folder, cifar-10-python.tar.gz or .npz")
    p.add_argument("--out", required=True, help="destination folder or s3://bucket/prefix")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--resolution", type=int, default=None, help="centre-crop and resize to RxR (default: keep)")
    p.add_argument("--workers", type=int, default=None, help="parallel Ray tasks (default: all CPUs; 0 = no Ray)")
    p.add_argument("--format", dest="image_format", choices=["png", "jpg", "webp"], default="png")
    p.add_argument("--quality", type=int, default=95, help="jpg/webp quality (default 95)")
    p.add_argument("--num-samples", type=int, default=None, help="size of a builtin dataset / cap on other sources")
    p.add_argument("--seed", type=int, default=0, help="seed of a builtin dataset")
    p.add_argument("--split", choices=["train", "test"], default="train", help="CIFAR-10 split")
    p.add_argument("--endpoint-url", default=None, help="S3 endpoint (default: AWS_ENDPOINT_URL or AWS)")
    p.add_argument("--overwrite", action="store_true", help="replace a different dataset already at --out")
    p.add_argument("--ray-address", default=None, help="Ray cluster address (default: RAY_ADDRESS or local)")
    p.add_argument("--verify", action="store_true", help="stream every shard afterwards and check its sha256")
    p.add_argument("--embed", choices=["clip"], default=None, help="store CLIP embeddings per sample (clip_img, clip_txt)")
    p.add_argument("--clip-model", default=None, help="open_clip model name (shapes-tiny, shapes-micro, or open_clip's)")
    p.add_argument("--clip-weights", default=None, help="its weights file (.safetensors; local or s3://)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from pipeline.data import storage
    from pipeline.data.prepare import prepare_dataset
    from pipeline.data.shards import verify_dataset

    from pipeline.data.prepare import EmbedSpec

    try:
        embed = None
        if args.embed == "clip":
            if not args.clip_model or not args.clip_weights:
                raise ValueError("--embed clip needs --clip-model NAME and --clip-weights FILE (a local weights file; "
                                 "train one with python launch/train_clip.py --out FILE)")
            embed = EmbedSpec(args.clip_model, args.clip_weights)
        elif args.clip_model or args.clip_weights:
            raise ValueError("--clip-model/--clip-weights are only allowed with --embed clip")
        settings = storage.S3Settings(endpoint_url=args.endpoint_url)
        result = prepare_dataset(
            args.source,
            args.out,
            shard_size=args.shard_size,
            resolution=args.resolution,
            workers=args.workers,
            image_format=args.image_format,
            quality=args.quality,
            num_samples=args.num_samples,
            seed=args.seed,
            split=args.split,
            overwrite=args.overwrite,
            ray_address=args.ray_address,
            settings=settings,
            embed=embed,
        )
        if args.verify:
            problems = verify_dataset(args.out, settings)
            if problems:
                print("error: verification failed:\n  " + "\n  ".join(problems), file=sys.stderr)
                return 1
    except (ValueError, FileNotFoundError, FileExistsError, storage.StorageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    m = result.manifest
    print(
        f"{m.url}: {m.num_samples} samples in {len(m.shards)} shards ({result.written} written, "
        f"{result.reused} already there) in {result.seconds:.1f} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
