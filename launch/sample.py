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
(seed and label of each image). Editing (``evaluation/editing.py``): ``--inpaint IMAGE --mask MASK``,
``--invert IMAGE`` (x_T saved as OUT.npy), ``--interpolate A.npy B.npy --frames K``, each writing a
row to ``--out`` (.png) and OUT.json. Bad input exits with status 2 and a message.
``--from-images DIR`` (a representation model): each image of DIR is encoded and ``--num``
samples are drawn from its code, one row per image (the image, then its samples; sample k of
every row uses seed ``sample_seed(seed, k)``); ``--code-interpolate K`` also writes OUT-interpolation.png:
K samples along the segment between the codes of DIR's first two images, one seed.

unCLIP (DALL-E 2; ``evaluation/unclip.py``), with ``--model`` an embedding-conditioned decoder and
``--clip-model NAME --clip-weights FILE`` the CLIP model its data were embedded with:
``--prompt TEXT [--prompt TEXT ...] --prior PRIOR`` (caption -> text embedding -> prior -> image
embedding -> decoder [-> --upsampler]; one row of --num images per prompt, ``--prior-guidance W``
and ``--guidance-scale W`` the prior's and the decoder's classifier-free guidance),
``--variations-of IMAGE`` (--num decodings of the image's embedding), ``--slerp A B --frames K``
(decodings along the slerp between two images' embeddings, one seed); --out is a .png grid and
OUT.json records the prompts, seeds and settings.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from evaluation import editing
    from pipeline.diffusion.registry import describe_samplers

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="exported model folder")
    p.add_argument("--num", type=int, help="number of images N (required, except for --invert/--interpolate)")
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
    # ADM-U cascade: the --model images upsampled by a super-resolution export (evaluation/cascade.py)
    p.add_argument("--upsampler", help="export of a super-resolution model: upsample every image (cascade)")
    p.add_argument("--upsampler-sampler", help="its sampler (default: the objective's default)")
    p.add_argument("--upsampler-steps", type=int, default=50, help="its sampling steps")
    p.add_argument("--upsampler-noise-level", type=float,
                   help="noise level s in [0, 1) of its low-resolution input (default: the export's)")
    editing.add_arguments(p)
    p.add_argument("--from-images", help="a representation model: encode the images of this folder and draw "
                   "--num samples from each one's code (--out: a .png grid)")
    p.add_argument("--code-interpolate", type=int, default=0, help="with --from-images: K samples between the codes "
                   "of the first two images")
    g = p.add_argument_group("unCLIP (--model: a decoder conditioned on CLIP image embeddings; --out: a .png grid)")
    g.add_argument("--prompt", action="append", help="a caption (repeat for several): text -> prior -> decoder")
    g.add_argument("--prior", help="export of a unCLIP prior (text embedding -> image embedding), for --prompt")
    g.add_argument("--prior-guidance", type=float, default=0.0, help="the prior's classifier-free guidance w >= 0")
    g.add_argument("--prior-steps", type=int, default=64, help="the prior's sampling steps (DALL-E 2: 64)")
    g.add_argument("--candidates", type=int, help="prior draws per image, the highest dot product with the text "
                   "embedding kept (default: the prior's, DALL-E 2's 2)")
    g.add_argument("--variations-of", metavar="IMAGE", help="decode IMAGE's CLIP embedding --num times")
    g.add_argument("--slerp", nargs=2, metavar=("A", "B"), help="decode --frames points between two images' "
                   "CLIP embeddings (slerp), one seed")
    g.add_argument("--clip-model", help="the CLIP model the training data were embedded with (e.g. shapes-tiny)")
    g.add_argument("--clip-weights", help="its weights file (local; nothing is downloaded)")
    return p.parse_args(argv)


def _unclip_requested(args) -> bool:
    return bool(args.prompt is not None or args.prior or args.variations_of or args.slerp)


def _unclip_args(args) -> str | None:
    """The first problem with the unCLIP arguments, or None."""
    modes = [m for m, on in (("--prompt", args.prompt is not None), ("--variations-of", args.variations_of),
                             ("--slerp", args.slerp)) if on]
    if len(modes) != 1:
        return f"give exactly one of --prompt, --variations-of, --slerp (got {', '.join(modes) or 'none'})"
    if args.prompt is not None and not args.prior:
        return "--prompt: needs --prior (the export of a unCLIP prior)"
    if not args.clip_model or not args.clip_weights:
        return "--clip-model and --clip-weights: required (the CLIP model the data were embedded with)"
    if args.slerp is None and (args.num is None or args.num < 1):
        return f"--num: {args.num} is not allowed; it must be >= 1"
    if args.slerp is not None and args.frames < 2:
        return f"--frames: {args.frames} is not allowed; it must be >= 2"
    for name in ("guidance_scale", "prior_guidance"):
        if getattr(args, name) < 0:
            return f"--{name.replace('_', '-')}: {getattr(args, name)} is not allowed; it must be >= 0"
    if args.prior_steps < 1 or (args.steps is not None and args.steps < 1):
        return "--prior-steps / --steps: must be >= 1"
    if args.seed < 0:
        return f"--seed: {args.seed} is not allowed; it must be >= 0"
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        return f"--out: {args.out!r} is not allowed for unCLIP sampling; give a .png grid"
    if out.exists() and not args.overwrite:
        return f"--out: {args.out!r} exists; pass --overwrite to replace it"
    return None


def _unclip(args) -> int:
    """--prompt / --variations-of / --slerp: the unCLIP chain (evaluation/unclip.py); one .png grid + OUT.json."""
    problem = _unclip_args(args)
    if problem:
        return _fail(problem)
    import numpy as np
    import torch

    from evaluation import unclip
    from evaluation.model_sampling import to_uint8
    from pipeline.loading import load_model

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        if args.prompt is not None:
            unclip.check_prompts(args.prompt)
        from pipeline.data.clip_embed import load_embedder

        embedder = load_embedder(args.clip_model, args.clip_weights)
        decoder = load_model(args.model, device=device)
        prior = load_model(args.prior, device=device) if args.prompt is not None else None
        unclip.check_chain(prior, decoder, int(embedder.dim))
        size = int(decoder.network.config.image_size)
        kw = {"steps": args.steps or 50, "guidance_scale": args.guidance_scale, "sampler": args.sampler,
              "eta": args.eta or 0.0, "device": device}
        record = {"decoder": str(args.model), "prior": args.prior, "clip": embedder.identity(), "seed": args.seed,
                  "guidance_scale": args.guidance_scale, "steps": kw["steps"], "sampler": args.sampler}
        if args.prompt is not None:
            images, seeds, _ = unclip.text_to_images(
                prior, decoder, embedder, args.prompt, args.num, args.seed, prior_steps=args.prior_steps,
                prior_guidance=args.prior_guidance, candidates=args.candidates, batch_size=args.batch_size, **kw)
            rows, nrow = to_uint8(images), args.num
            record.update(prompts=args.prompt, prior_guidance=args.prior_guidance, prior_steps=args.prior_steps,
                          candidates=args.candidates, seeds=seeds,
                          layout="row p: the --num images of prompt p; image j of prompt p uses seed "
                                 "sample_seed(seed, p num + j)")
        elif args.variations_of:
            source = unclip.read_image(args.variations_of, size)
            images, seeds = unclip.image_variations(decoder, embedder, source, args.num, args.seed, **kw)
            rows, nrow = np.concatenate([source[None], to_uint8(images)]), args.num + 1
            record.update(variations_of=args.variations_of, seeds=seeds,
                          layout="the image, then its --num variations (seed sample_seed(seed, j))")
        else:
            a, b = (unclip.read_image(path, size) for path in args.slerp)
            images = unclip.slerp_images(decoder, embedder, a, b, args.frames, args.seed, **kw)
            rows, nrow = np.concatenate([a[None], to_uint8(images), b[None]]), args.frames + 2
            record.update(slerp=args.slerp, frames=args.frames,
                          layout="A, the --frames decodings along the slerp, B (one seed)")
        if args.upsampler:  # the ADM-U cascade on the decoder's images
            from evaluation.cascade import check_upsampler, upsample_images

            up = load_model(args.upsampler, device=device)
            check_upsampler(up, size, 0, sampler=args.upsampler_sampler, steps=args.upsampler_steps,
                            noise_level=args.upsampler_noise_level)
            seeds_all = list(range(len(rows)))
            rows, record["cascade"] = upsample_images(up, rows, seeds_all, None, sampler=args.upsampler_sampler,
                                                      steps=args.upsampler_steps,
                                                      noise_level=args.upsampler_noise_level, device=device)
    except (ValueError, FileNotFoundError, ImportError) as exc:
        return _fail(str(exc))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _to_pil(grid(rows, nrow=nrow)).save(out)
    out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {len(rows)} images to {out} (and {out.with_suffix('.json').name})")
    return 0


def _from_images(args, loaded, settings, device, out: Path) -> int:
    """--from-images: rows of (image, samples from its code); optionally an interpolation row."""
    from evaluation.reconstruction import interpolation_row, read_images, reconstruction_grid

    if out.suffix.lower() != ".png" or args.code_interpolate < 0:
        return _fail("--from-images: --out must be a .png grid and --code-interpolate >= 0")
    try:
        images = read_images(args.from_images, int(loaded.network.config.image_size))
        rows, _ = reconstruction_grid(loaded, images, args.num, settings, args.seed, device, args.batch_size)
        row = None
        if args.code_interpolate:
            if len(images) < 2 or args.code_interpolate < 2:
                return _fail("--code-interpolate: needs K >= 2 and two images in --from-images")
            row = interpolation_row(loaded, images[0], images[1], args.code_interpolate, settings, args.seed, device)
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


def check_args(args: argparse.Namespace) -> str | None:
    """The first problem with the arguments, or None."""
    if args.num is None:
        return "--num: required (the number of images N)"
    if args.num < 1:
        return f"--num: {args.num} is not allowed; it must be >= 1"
    if args.batch_size < 1:
        return f"--batch-size: {args.batch_size} is not allowed; it must be >= 1"
    if args.guidance_scale < 0:
        return f"--guidance-scale: {args.guidance_scale} is not allowed; it must be >= 0"
    if args.classifier_scale < 0:
        return f"--classifier-scale: {args.classifier_scale} is not allowed; it must be >= 0"
    if args.classifier_scale and not args.classifier_run:
        return f"--classifier-scale: {args.classifier_scale} needs --classifier-run"
    if args.seed < 0:
        return f"--seed: {args.seed} is not allowed; it must be >= 0"
    out = Path(args.out)
    if out.exists() and (out.suffix.lower() == ".png" or any(out.iterdir())) and not args.overwrite:
        return f"--out: {args.out!r} exists; pass --overwrite to replace it"
    return None


def build_sampler(args: argparse.Namespace, device: str):
    """``(sample_fn, settings, class names)`` for the export and flags (ValueError on bad input)."""
    from evaluation.model_sampling import SamplerSettings, check_classifier_fits, load_classifier, make_sample_fn
    from pipeline.diffusion.registry import OBJECTIVES
    from pipeline.loading import load_model

    loaded = load_model(args.model, device=device)
    config = loaded.config
    defaults = config.sampling
    default_sampler = defaults.get("sampler") or OBJECTIVES[loaded.diffusion.objective].for_options(
        loaded.diffusion.objective_options()).default_sampler
    options = {k: v for k, v in defaults.items()
               if k in SamplerSettings.__dataclass_fields__ and k not in ("sampler", "steps", "eta")}
    settings = SamplerSettings(args.sampler or default_sampler,
                               args.steps if args.steps is not None else int(defaults.get("steps", 50)),
                               args.eta if args.eta is not None else float(defaults.get("eta", 0.0)),
                               guidance_scale=args.guidance_scale, classifier_scale=args.classifier_scale,
                               class_label=args.class_label, **options)
    diffusion = loaded.diffusion.model_dump(mode="json")
    if args.guidance_scale and not config.num_classes:
        raise ValueError(f"--guidance-scale: {args.guidance_scale} is not allowed for an unconditional model")
    classifier = None
    if args.classifier_run and args.classifier_scale:
        classifier, classifier_diffusion, _ = load_classifier(args.classifier_run)
        check_classifier_fits(diffusion, classifier_diffusion)
    num_classes = config.num_classes or (classifier.config.num_classes if classifier is not None else 0)
    if args.class_label is not None and not (num_classes and 0 <= args.class_label < num_classes):
        allowed = f"0..{num_classes - 1}" if num_classes else "none: the model is unconditional"
        raise ValueError(f"--class-label: {args.class_label} is not allowed; classes: {allowed}")
    if args.guidance_scale and config.num_classes and not loaded.diffusion.label_dropout:
        print("warning: the model was trained without label dropout (diffusion.label_dropout=0); its null "
              "class is untrained and guidance will not behave as intended", file=sys.stderr)
    sample_fn = make_sample_fn(loaded.network, settings, device=device, diffusion=diffusion,
                               objective=loaded.objective, classifier=classifier)
    up = None
    if args.upsampler:  # the ADM-U second stage, checked before any sampling
        from evaluation.cascade import check_upsampler

        up = load_model(args.upsampler, device=device)
        check_upsampler(up, int(loaded.network.config.image_size), num_classes, sampler=args.upsampler_sampler,
                        steps=args.upsampler_steps, noise_level=args.upsampler_noise_level)
    return sample_fn, settings, config.class_names, up, loaded


def write_images(args: argparse.Namespace, images, labels: list[int], seeds, settings, names,
                 cascade: dict | None = None, steps_used: int | None = None) -> None:
    """One grid PNG (``--out`` ending in .png), or one PNG per image plus samples.json."""
    out = Path(args.out)
    if out.suffix.lower() == ".png":
        out.parent.mkdir(parents=True, exist_ok=True)
        _to_pil(grid(images, nrow=math.ceil(math.sqrt(args.num)))).save(out)
        return
    out.mkdir(parents=True, exist_ok=True)
    from evaluation.seeds import image_records

    for i, img in enumerate(images):
        _to_pil(img).save(out / f"{i:06d}.png")
    records = image_records(seeds, labels or None, names)
    info = {"model": str(args.model), "sampler": settings.as_dict(), "steps_used": steps_used,
            "guidance_scale": args.guidance_scale,
            "classifier_run": args.classifier_run, "classifier_scale": args.classifier_scale,
            "class_label": args.class_label, "seed": args.seed, "cascade": cascade,
            "seed_rule": "image i uses evaluation.seeds.sample_seed(seed, i)", "images": records}
    (out / "samples.json").write_text(json.dumps(info, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    from evaluation import editing

    args = parse_args(argv)
    if _unclip_requested(args):  # --prompt / --variations-of / --slerp: evaluation/unclip.py
        return _unclip(args)
    if editing.requested(args):  # --inpaint / --invert / --interpolate: evaluation/editing.py
        return editing.run_cli(args)
    problem = check_args(args)
    if problem:
        return _fail(problem)

    import numpy as np
    import torch
    from tqdm.auto import tqdm

    from evaluation.seeds import sample_seeds

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        sample_fn, settings, names, up, loaded = build_sampler(args, device)
    except ValueError as exc:
        return _fail(str(exc))
    if args.from_images:
        return _from_images(args, loaded, settings, device, Path(args.out))
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
    images, cascade = np.concatenate(images), None
    if up is not None:  # ADM-U cascade: the second stage, conditioned on these images
        from evaluation.cascade import upsample_images

        try:
            images, cascade = upsample_images(up, images, seeds, labels or None, sampler=args.upsampler_sampler,
                                              steps=args.upsampler_steps, noise_level=args.upsampler_noise_level,
                                              batch_size=args.batch_size, device=device)
        except ValueError as exc:
            return _fail(str(exc))
    write_images(args, images, labels, seeds, settings, names, cascade, getattr(sample_fn, "steps_used", None))
    print(f"wrote {args.num} images to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
