"""Generate images from an exported model folder (launch/export.py --format native).

    python launch/sample.py --model DIR --num N [--sampler NAME] [--steps S] [--eta E]
                            [--class-label K] [--guidance-scale W]
                            [--classifier-run RUN [--classifier-scale S]] [--seed S]
                            [--batch-size B] [--device cpu|cuda] [--overwrite] --out grid.png|DIR/

Image i is drawn from seed ``evaluation.seeds.sample_seed(S, i)`` by the evaluation stage's own
sampler (``evaluation.model_sampling.make_sample_fn``), so for the same seed, sampler and steps
the images equal those the evaluation stage generated for its metrics. A class-conditional
model draws each image's label from its seed, unless ``--class-label`` fixes it;
``--guidance-scale W`` applies classifier-free guidance (Ho & Salimans eq. 6, w = 0: conditional);
``--classifier-run RUN --classifier-scale S`` guides the discrete ancestral/DDIM samplers with the
EMA of a noisy-classifier training run (ADM). The sampler must fit the model's objective (``--help``
lists them, from the registry ``pipeline.diffusion.OBJECTIVES``); a VDM samples with the learned
noise schedule the export holds in objective.safetensors.
``--out`` ending in .png writes one grid; otherwise a folder of PNGs plus samples.json
(seed and label of each image). Bad input exits with status 2 and a message.

``--from-images DIR`` (a representation model): each image of DIR is encoded and ``--num``
samples are drawn from its code, one row per image (the image, then its samples; sample k of
every row uses seed ``sample_seed(seed, k)``); ``--interpolate K`` also writes OUT-interpolation.png:
K samples along the segment between the codes of DIR's first two images, one seed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from pipeline.diffusion.registry import describe_samplers

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="exported model folder")
    p.add_argument("--num", type=int, required=True, help="number of images N")
    p.add_argument("--sampler", help="a sampler of the model's objective (default: the run's evaluation sampler); "
                   f"by objective: {describe_samplers()}")
    p.add_argument("--steps", type=int, help="sampling steps (default: the run's evaluation steps)")
    p.add_argument("--eta", type=float, help="DDIM eta (default: the run's evaluation eta)")
    p.add_argument("--class-label", type=int, help="class of every image (class-conditional models)")
    p.add_argument("--guidance-scale", type=float, default=0.0, help="classifier-free guidance weight w >= 0")
    p.add_argument("--classifier-run", help="run directory of a noisy classifier (objective 'classifier')")
    p.add_argument("--classifier-scale", type=float, default=0.0, help="classifier guidance scale s >= 0")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed sample_seed(seed, i)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--out", required=True, help="grid.png, or a folder for one PNG per image")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--from-images", help="a representation model: encode the images of this folder and draw "
                   "--num samples from each one's code (--out: a .png grid)")
    p.add_argument("--interpolate", type=int, default=0, help="with --from-images: K samples between the codes "
                   "of the first two images")
    return p.parse_args(argv)


def _from_images(args, loaded, settings, device, out: Path) -> int:
    """--from-images: rows of (image, samples from its code); optionally an interpolation row."""
    from evaluation.reconstruction import interpolation_row, read_images, reconstruction_grid

    if out.suffix.lower() != ".png" or args.interpolate < 0:
        return _fail("--from-images: --out must be a .png grid and --interpolate >= 0")
    try:
        images = read_images(args.from_images, int(loaded.network.config.image_size))
        rows, _ = reconstruction_grid(loaded, images, args.num, settings, args.seed, device, args.batch_size)
        row = None
        if args.interpolate:
            if len(images) < 2 or args.interpolate < 2:
                return _fail("--interpolate: needs K >= 2 and two images in --from-images")
            row = interpolation_row(loaded, images[0], images[1], args.interpolate, settings, args.seed, device)
    except ValueError as exc:
        return _fail(str(exc))
    out.parent.mkdir(parents=True, exist_ok=True)
    _to_pil(grid(rows.reshape(-1, *rows.shape[2:]), nrow=rows.shape[1])).save(out)
    if row is not None:
        _to_pil(grid(row, nrow=len(row))).save(out.with_name(f"{out.stem}-interpolation.png"))
    print(f"wrote {len(images)} rows of an image and {args.num} samples from its code to {out}")
    return 0


def grid(images, nrow: int, padding: int = 2):
    """(N, H, W, C) uint8 -> one (rows, cols) grid image with ``padding`` black pixels between cells."""
    import numpy as np

    n, h, w, c = images.shape
    rows = math.ceil(n / nrow)
    out = np.zeros((rows * (h + padding) + padding, nrow * (w + padding) + padding, c), dtype=np.uint8)
    for i, img in enumerate(images):
        r, k = divmod(i, nrow)
        y, x = padding + r * (h + padding), padding + k * (w + padding)
        out[y:y + h, x:x + w] = img
    return out


def _to_pil(array):
    from PIL import Image

    return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.num < 1:
        return _fail(f"--num: {args.num} is not allowed; it must be >= 1")
    if args.batch_size < 1:
        return _fail(f"--batch-size: {args.batch_size} is not allowed; it must be >= 1")
    if args.guidance_scale < 0:
        return _fail(f"--guidance-scale: {args.guidance_scale} is not allowed; it must be >= 0")
    if args.classifier_scale < 0:
        return _fail(f"--classifier-scale: {args.classifier_scale} is not allowed; it must be >= 0")
    if args.classifier_scale and not args.classifier_run:
        return _fail(f"--classifier-scale: {args.classifier_scale} needs --classifier-run")
    if args.seed < 0:
        return _fail(f"--seed: {args.seed} is not allowed; it must be >= 0")
    out = Path(args.out)
    as_grid = out.suffix.lower() == ".png"
    if out.exists() and (as_grid or any(out.iterdir())) and not args.overwrite:
        return _fail(f"--out: {args.out!r} exists; pass --overwrite to replace it")

    import numpy as np
    import torch
    from tqdm.auto import tqdm

    from evaluation.model_sampling import (
        SamplerSettings,
        check_classifier_fits,
        load_classifier,
        make_sample_fn,
    )
    from evaluation.seeds import sample_seeds
    from pipeline.diffusion.registry import OBJECTIVES
    from pipeline.loading import load_model

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        loaded = load_model(args.model, device=device)
        config = loaded.config
        defaults = config.sampling
        default_sampler = defaults.get("sampler") or OBJECTIVES[loaded.diffusion.objective].default_sampler
        settings = SamplerSettings(args.sampler or default_sampler,
                                   args.steps if args.steps is not None else int(defaults.get("steps", 50)),
                                   args.eta if args.eta is not None else float(defaults.get("eta", 0.0)),
                                   guidance_scale=args.guidance_scale, classifier_scale=args.classifier_scale,
                                   class_label=args.class_label,
                                   **{k: v for k, v in defaults.items()
                                      if k in SamplerSettings.__dataclass_fields__ and k not in ("sampler", "steps",
                                                                                               "eta")})
        diffusion = loaded.diffusion.model_dump(mode="json")
        if args.guidance_scale and not config.num_classes:
            return _fail(f"--guidance-scale: {args.guidance_scale} is not allowed for an unconditional model")
        classifier = None
        if args.classifier_run and args.classifier_scale:
            classifier, classifier_diffusion, _ = load_classifier(args.classifier_run)
            check_classifier_fits(diffusion, classifier_diffusion)
        num_classes = config.num_classes or (classifier.config.num_classes if classifier is not None else 0)
        if args.class_label is not None and not (num_classes and 0 <= args.class_label < num_classes):
            allowed = f"0..{num_classes - 1}" if num_classes else "none: the model is unconditional"
            return _fail(f"--class-label: {args.class_label} is not allowed; classes: {allowed}")
        if args.guidance_scale and config.num_classes and not config.diffusion.label_dropout:
            print("warning: the model was trained without label dropout (diffusion.label_dropout=0); its null "
                  "class is untrained and guidance will not behave as intended", file=sys.stderr)
        sample_fn = make_sample_fn(loaded.network, settings, device=device, diffusion=diffusion,
                                   objective=loaded.objective, classifier=classifier)
    except ValueError as exc:
        return _fail(str(exc))
    if args.from_images:
        return _from_images(args, loaded, settings, device, out)

    indices = np.arange(args.num)
    seeds = sample_seeds(args.seed, indices)
    images, labels = [], []
    for start in tqdm(range(0, args.num, args.batch_size), desc="sampling", unit="batch"):
        stop = min(start + args.batch_size, args.num)
        result = sample_fn(indices[start:stop], seeds[start:stop])
        batch, batch_labels = result if isinstance(result, tuple) else (result, None)
        images.append(batch)
        if batch_labels is not None:
            labels.extend(int(v) for v in batch_labels)
    images = np.concatenate(images)
    names = config.class_names
    if as_grid:
        out.parent.mkdir(parents=True, exist_ok=True)
        _to_pil(grid(images, nrow=math.ceil(math.sqrt(args.num)))).save(out)
    else:
        out.mkdir(parents=True, exist_ok=True)
        records = []
        for i, img in enumerate(images):
            _to_pil(img).save(out / f"{i:06d}.png")
            rec = {"index": i, "file": f"{i:06d}.png", "seed": int(seeds[i])}
            if labels:
                rec["label"] = labels[i]
                if names:
                    rec["class_name"] = names[labels[i]]
            records.append(rec)
        info = {"model": str(args.model), "sampler": settings.as_dict(), "guidance_scale": args.guidance_scale,
                "classifier_run": args.classifier_run, "classifier_scale": args.classifier_scale,
                "class_label": args.class_label, "seed": args.seed,
                "seed_rule": "image i uses evaluation.seeds.sample_seed(seed, i)", "images": records}
        (out / "samples.json").write_text(json.dumps(info, indent=1) + "\n")
    print(f"wrote {args.num} images to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
