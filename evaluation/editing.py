"""Image editing with a trained model: inpainting, DDIM inversion and slerp interpolation.

Everything samples through the registry's one entry (``pipeline.diffusion.registry.sample``) on the
view of a model loaded by ``pipeline.loading.load_model``, and image ``i`` uses the seed
``evaluation.seeds.sample_seed(seed, i)`` exactly as plain sampling does (its noise and, for a
class-conditional model, its label).

- Inpainting (``inpaint``): the known pixels (mask white) are replaced at every step by a forward
  sample of them, with RePaint resampling for the discrete samplers (Lugmayr et al. 2022,
  Algorithm 1; sampler option ``resample``) and the predictor-corrector sampler for the score SDEs
  (Song et al. 2021, sec. 5); the output keeps them exactly.
- Inversion (``invert``): DDIM eq. 13 run forward, x_0 -> x_T (``pipeline.diffusion.ddim_invert``,
  discrete objectives), decoded back by DDIM with eta = 0 (``decode``).
- Interpolation (``interpolate``): slerp between two x_T (DDIM sec. 5.3), each frame decoded by DDIM.

``add_arguments`` and ``run_cli`` are the ``launch/sample.py`` side: ``--inpaint IMAGE --mask MASK``,
``--invert IMAGE``, ``--interpolate A.npy B.npy --frames K``; bad input raises ValueError (exit 2).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from evaluation.model_sampling import from_uint8, labels_from_seeds, to_uint8
from evaluation.seeds import sample_seeds
from pipeline.diffusion import ddim_invert, registry, slerp
from pipeline.diffusion.guidance import classifier_free_guidance
from pipeline.diffusion.sampling import DiscreteView, VDMView

__all__ = [
    "EditModel",
    "add_arguments",
    "ddim_sampler",
    "decode",
    "inpaint",
    "interpolate",
    "invert",
    "load_edit_model",
    "read_image",
    "read_latent",
    "read_mask",
    "requested",
    "row",
    "run_cli",
]


def ddim_sampler() -> str:
    """The registry's name of the DDIM sampler (the one whose runner is ``registry.run_ddim``)."""
    return next(name for name, spec in registry.SAMPLERS.items() if spec.run is registry.run_ddim)


@dataclass(frozen=True)
class EditModel:
    """A loaded model as the editing functions need it: its sampling view (guidance applied), the
    objective's name, the image shape (C, H, W), its classes, sampling defaults and its objective's
    options (which may choose the samplers that fit it)."""

    view: Any
    objective: str
    shape: tuple[int, int, int]
    num_classes: int
    defaults: dict[str, Any]
    device: str
    class_label: int | None = None
    options: Any = None

    def labels(self, seeds: np.ndarray) -> Tensor | None:
        """One label per seed, as plain sampling draws them (fixed ``class_label`` or from the seed)."""
        if not self.num_classes:
            return None
        if self.class_label is not None:
            return torch.full((len(seeds),), self.class_label, dtype=torch.int64, device=self.device)
        return torch.as_tensor(labels_from_seeds(np.asarray(seeds), self.num_classes), device=self.device)

    def steps(self, steps: int | None) -> int:
        return int(steps) if steps is not None else int(self.defaults.get("steps", 50))


def load_edit_model(model: str, device: str = "cpu", *, class_label: int | None = None,
                    guidance_scale: float = 0.0) -> EditModel:
    """An export or run directory (``load_model``) ready for editing; ValueError on bad input."""
    from pipeline.loading import load_model

    loaded = load_model(model, device=device)
    net = loaded.network.to(device).eval()
    num_classes = loaded.num_classes
    if class_label is not None and not (num_classes and 0 <= class_label < num_classes):
        allowed = f"0..{num_classes - 1}" if num_classes else "none: the model is unconditional"
        raise ValueError(f"--class-label: {class_label} is not allowed; classes: {allowed}")
    if guidance_scale and not num_classes:
        raise ValueError(f"--guidance-scale: {guidance_scale} is not allowed for an unconditional model")
    if not num_classes:
        def net(x, t, y=None, _model=net, **cond):  # the network never sees labels
            return _model(x, t, None, **cond)
    elif guidance_scale:
        net = classifier_free_guidance(net, guidance_scale, null_class=num_classes)
    loaded.objective.to(device).eval()
    view = loaded.view(net)
    options = loaded.diffusion.objective_options()
    config = loaded.network.config
    channels = registry.data_channels(loaded.diffusion.objective, options, int(config.in_channels))
    defaults = dict(getattr(loaded.config, "sampling", None) or {})
    return EditModel(view, loaded.diffusion.objective, (channels, int(config.image_size), int(config.image_size)),
                     num_classes, defaults, str(device), class_label, options)


# ---------------------------------------------------------------------------------------------
# Images and latents


def _read_png(path: str, what: str) -> np.ndarray:
    from PIL import Image

    if not Path(path).is_file():
        raise ValueError(f"{what}: {path!r} does not exist; expected a PNG file")
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            array = np.asarray(img.convert("L" if mode in ("1", "L", "I", "I;16", "F") else "RGB"))
    except OSError as exc:
        raise ValueError(f"{what}: {path!r} is not a readable image ({exc})") from None
    return array[..., None] if array.ndim == 2 else array


def read_image(path: str, shape: tuple[int, int, int], what: str = "--inpaint") -> Tensor:
    """A PNG as (1, C, H, W) in [-1, 1]; ValueError unless it is the model's size (a gray image
    fills every channel of a colour model)."""
    array = _read_png(path, what)
    c, h, w = shape
    if array.shape[:2] != (h, w):
        raise ValueError(f"{what}: {path!r} is {array.shape[1]}x{array.shape[0]} pixels; the model takes "
                         f"{w}x{h} images")
    if array.shape[2] != c:
        if c == 1:
            raise ValueError(f"{what}: {path!r} has {array.shape[2]} channels; the model takes gray images")
        array = np.repeat(array, c, axis=2)
    return from_uint8(array[None])


def read_mask(path: str, shape: tuple[int, int, int]) -> Tensor:
    """A PNG mask as (1, C, H, W) bool, True (white, >= 128) where the pixel is known; one channel
    masks every channel. ValueError unless its size is the image's."""
    array = _read_png(path, "--mask")
    c, h, w = shape
    if array.shape[:2] != (h, w):
        raise ValueError(f"--mask: {path!r} is {array.shape[1]}x{array.shape[0]} pixels; it must be the image's "
                         f"size, {w}x{h}")
    if array.shape[2] not in (1, c):
        raise ValueError(f"--mask: {path!r} has {array.shape[2]} channels; allowed: 1 or {c}")
    known = torch.as_tensor(array >= 128).permute(2, 0, 1)[None]
    return known.expand(1, c, h, w).clone()


def read_latent(path: str, shape: tuple[int, int, int]) -> Tensor:
    """An x_T saved by ``--invert`` (.npy, (C, H, W) or (1, C, H, W)) as (1, C, H, W) float32."""
    if not Path(path).is_file():
        raise ValueError(f"--interpolate: {path!r} does not exist; expected an .npy x_T written by --invert")
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise ValueError(f"--interpolate: {path!r} is not an .npy array ({exc})") from None
    if array.shape not in (tuple(shape), (1, *shape)) or not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"--interpolate: {path!r} holds a {array.dtype} array of shape {array.shape}; the model's "
                         f"x_T is float of shape {tuple(shape)}")
    if not np.isfinite(array).all():
        raise ValueError(f"--interpolate: {path!r} has non-finite values")
    return torch.as_tensor(array.reshape(1, *shape), dtype=torch.float32)


def row(images: np.ndarray, padding: int = 2) -> np.ndarray:
    """(N, H, W, C) uint8 -> one row image with ``padding`` black pixels around and between cells."""
    n, h, w, c = images.shape
    out = np.zeros((h + 2 * padding, n * (w + padding) + padding, c), dtype=np.uint8)
    for i, img in enumerate(images):
        x = padding + i * (w + padding)
        out[padding:padding + h, x:x + w] = img
    return out


# ---------------------------------------------------------------------------------------------
# The three edits


def check_inpainting(model: EditModel, sampler: str) -> None:
    """ValueError unless ``sampler`` inpaints for the model's objective."""
    registry.check_sampler_fits(model.objective, sampler, inpainting=True, options=model.options)
    if isinstance(model.view, VDMView):  # VDM's ancestral sampler takes no known pixels
        raise ValueError(f"--inpaint: objective {model.objective!r} has no inpainting sampler")


def inpaint(model: EditModel, known: Tensor, mask: Tensor, seeds: np.ndarray, *, sampler: str, steps: int,
            options: dict[str, Any] | None = None) -> Tensor:
    """One completion of ``known`` (1, C, H, W) per seed, keeping it exactly where ``mask`` is True."""
    check_inpainting(model, sampler)
    if tuple(known.shape[1:]) != model.shape or tuple(mask.shape) != tuple(known.shape):
        raise ValueError(f"known/mask: shapes {tuple(known.shape)} and {tuple(mask.shape)} are not allowed; "
                         f"expected (1, {', '.join(map(str, model.shape))}) both")
    n = len(seeds)
    known_b = known.to(model.device).expand(n, *model.shape)
    mask_b = mask.to(model.device).expand(n, *model.shape)
    with torch.no_grad():  # the inpainting samplers return the known pixels exactly
        return registry.sample(model.view, sampler, (n, *model.shape), torch.as_tensor(np.asarray(seeds, np.int64)),
                               steps=steps, y=model.labels(seeds), options=options, known=known_b, mask=mask_b,
                               device=model.device)


def _discrete(model: EditModel, what: str) -> DiscreteView:
    if not isinstance(model.view, DiscreteView):
        allowed = [n for n, s in registry.OBJECTIVES.items() if s.discrete and s.generative]
        raise ValueError(f"{what}: objective {model.objective!r} is not allowed; DDIM inversion needs a "
                         f"discrete-time objective: {', '.join(allowed)}")
    return model.view


def invert(model: EditModel, x0: Tensor, seeds: np.ndarray, *, steps: int) -> Tensor:
    """x_T of ``x0`` (B, C, H, W) by DDIM inversion on ``steps`` respaced steps (labels from ``seeds``)."""
    view = _discrete(model, "--invert")
    schedule = registry.ddim_schedule(view, steps)  # the schedule the DDIM sampler decodes on
    with torch.no_grad():
        return ddim_invert(view.net, schedule, x0.to(model.device), y=model.labels(seeds),
                           parameterization=view.parameterization, variance=view.variance)


def decode(model: EditModel, x_T: Tensor, seeds: np.ndarray, *, steps: int, clip_denoised: bool = False) -> Tensor:
    """DDIM with eta = 0 from the given x_T (B, C, H, W), through ``registry.sample``."""
    registry.check_sampler_fits(model.objective, ddim_sampler(), options=model.options)
    options = {"eta": 0.0, "clip_denoised": clip_denoised}
    with torch.no_grad():
        return registry.sample(model.view, ddim_sampler(), tuple(x_T.shape),
                               torch.as_tensor(np.asarray(seeds, np.int64)), steps=steps, y=model.labels(seeds),
                               options=options, device=model.device, noise=x_T.to(model.device))


def interpolate(model: EditModel, z0: Tensor, z1: Tensor, frames: int, seeds: np.ndarray, *, steps: int,
                clip_denoised: bool = True) -> Tensor:
    """``frames`` images decoded from slerp(z0, z1, k / (frames - 1)), k = 0 .. frames - 1; every frame
    takes the label of ``seeds[0]`` (one class along the path)."""
    if frames < 2:
        raise ValueError(f"--frames: {frames} is not allowed; it must be >= 2")
    alpha = torch.linspace(0, 1, frames, dtype=torch.float64)
    path = slerp(z0.expand(frames, *model.shape), z1.expand(frames, *model.shape), alpha)
    one = np.full(frames, int(seeds[0]), dtype=np.int64)
    labels_seeds = one if model.num_classes else np.asarray(seeds)
    return decode(model, path, labels_seeds, steps=steps, clip_denoised=clip_denoised)


# ---------------------------------------------------------------------------------------------
# The launch/sample.py side


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("editing (--out must be a .png; --num, --steps, --seed, --class-label apply)")
    g.add_argument("--inpaint", metavar="IMAGE", help="complete IMAGE (PNG) where --mask is black; --num completions")
    g.add_argument("--mask", metavar="MASK", help="PNG mask for --inpaint: white = known (kept exactly), black = fill")
    g.add_argument("--resample", type=int, help="RePaint resampling rounds per step (discrete samplers; default 1)")
    g.add_argument("--invert", metavar="IMAGE", help="DDIM-invert IMAGE to x_T (saved as OUT.npy) and decode it back")
    g.add_argument("--interpolate", nargs=2, metavar=("A.npy", "B.npy"), help="slerp between two x_T, DDIM decode")
    g.add_argument("--frames", type=int, default=8, help="frames K of --interpolate (>= 2)")


def requested(args: argparse.Namespace) -> bool:
    return bool(args.inpaint or args.mask or args.invert or args.interpolate)


def _check_cli(args: argparse.Namespace) -> None:
    modes = [flag for flag, on in (("--inpaint", args.inpaint or args.mask), ("--invert", args.invert),
                                   ("--interpolate", args.interpolate)) if on]
    if len(modes) > 1:
        raise ValueError(f"{' and '.join(modes)}: one edit at a time")
    if bool(args.inpaint) != bool(args.mask):
        raise ValueError("--inpaint and --mask: give both (the image and its mask)")
    if args.resample is not None and (not args.inpaint or args.resample < 1):
        raise ValueError(f"--resample: {args.resample} is not allowed; it must be >= 1, with --inpaint")
    if args.frames < 2:
        raise ValueError(f"--frames: {args.frames} is not allowed; it must be >= 2")
    if not args.out.lower().endswith(".png"):
        raise ValueError(f"--out: {args.out!r} is not allowed for an edit; expected a .png file")
    if Path(args.out).exists() and not args.overwrite:
        raise ValueError(f"--out: {args.out!r} exists; pass --overwrite to replace it")
    if args.inpaint and (args.num is None or args.num < 1):
        raise ValueError(f"--num: {args.num} is not allowed with --inpaint; the number of completions must be >= 1")
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps: {args.steps} is not allowed; it must be >= 1")
    if args.seed < 0:
        raise ValueError(f"--seed: {args.seed} is not allowed; it must be >= 0")
    if args.guidance_scale < 0:
        raise ValueError(f"--guidance-scale: {args.guidance_scale} is not allowed; it must be >= 0")
    if args.classifier_run:
        raise ValueError("--classifier-run: not allowed with an edit (classifier guidance samples only)")
    ddim = ddim_sampler()
    if (args.invert or args.interpolate) and args.sampler not in (None, ddim):
        raise ValueError(f"--sampler: {args.sampler!r} is not allowed with --invert/--interpolate; they decode "
                         f"with {ddim!r} (eta 0)")
    if (args.invert or args.interpolate) and args.eta:
        raise ValueError(f"--eta: {args.eta} is not allowed with --invert/--interpolate; they decode with eta 0")


def _inpaint_sampler(model: EditModel, name: str | None) -> str:
    """``name``, or the objective's first sampler that inpaints (RePaint's ancestral steps for the
    discrete objectives, predictor-corrector for the score SDEs)."""
    if name:
        return name
    fits = registry.samplers_for(model.objective, model.options)
    able = [s for s in fits if registry.SAMPLERS[s].inpainting]
    return able[0] if able else fits[0]  # none: check_inpainting names the problem


def _sampler_options(model: EditModel, sampler: str, args: argparse.Namespace) -> dict[str, Any]:
    values = {k: v for k, v in model.defaults.items() if k not in ("sampler", "steps")}
    if args.eta is not None:
        values["eta"] = args.eta
    if args.resample is not None:
        if "resample" not in registry.SAMPLERS[sampler].options.model_fields:
            able = [s for s in registry.samplers_for(model.objective, model.options) if registry.SAMPLERS[s].inpainting
                    and "resample" in registry.SAMPLERS[s].options.model_fields]
            raise ValueError(f"--resample: not allowed with sampler {sampler!r} (RePaint resampling is for the "
                             f"discrete samplers); allowed with: {', '.join(able) or '(none for this objective)'}")
        values["resample"] = args.resample
    return registry.sampler_options(sampler, values).model_dump()


def run_cli(args: argparse.Namespace) -> int:
    """The edit asked for by ``args`` (see :func:`add_arguments`); 2 with a message on bad input."""
    try:
        return _run(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from PIL import Image

    _check_cli(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_edit_model(args.model, device, class_label=args.class_label, guidance_scale=args.guidance_scale)
    steps = model.steps(args.steps)
    out = Path(args.out)
    record: dict[str, Any] = {"model": str(args.model), "seed": args.seed, "steps": steps,
                              "seed_rule": "image i uses evaluation.seeds.sample_seed(seed, i)"}
    if args.inpaint:
        known, mask = read_image(args.inpaint, model.shape), read_mask(args.mask, model.shape)
        sampler = _inpaint_sampler(model, args.sampler)
        check_inpainting(model, sampler)
        seeds = sample_seeds(args.seed, np.arange(args.num))
        options = _sampler_options(model, sampler, args)
        x = inpaint(model, known, mask, seeds, sampler=sampler, steps=steps, options=options)
        images = to_uint8(x)
        record.update(edit="inpaint", image=args.inpaint, mask=args.mask, sampler=sampler, options=options,
                      known_fraction=float(mask.float().mean()))
        message = f"wrote {len(images)} completions to {out}"
    elif args.invert:
        x0 = read_image(args.invert, model.shape, "--invert")
        seeds = sample_seeds(args.seed, np.arange(1))
        x_T = invert(model, x0, seeds, steps=steps)
        back = decode(model, x_T, seeds, steps=steps)
        error, mean_error = float((back.cpu() - x0).abs().max()), float((back.cpu() - x0).abs().mean())
        images = np.concatenate([to_uint8(x0), to_uint8(back)])
        levels = int(np.abs(images[0].astype(np.int64) - images[1]).max())
        latent = out.with_suffix(".npy")
        out.parent.mkdir(parents=True, exist_ok=True)
        np.save(latent, x_T[0].cpu().numpy().astype(np.float32))
        record.update(edit="invert", image=args.invert, x_T=str(latent), round_trip_max_abs_error=error,
                      round_trip_mean_abs_error=mean_error, round_trip_max_levels=levels)
        message = (f"wrote x_T to {latent} and [input, reconstruction] to {out}; round trip ({steps} DDIM steps) "
                   f"max abs error {error:.3g} in [-1, 1] ({levels} of 255 levels), mean {mean_error:.3g}")
    else:
        z0, z1 = (read_latent(p, model.shape) for p in args.interpolate)
        seeds = sample_seeds(args.seed, np.arange(args.frames))
        clip = bool(model.defaults.get("clip_denoised", True))
        images = to_uint8(interpolate(model, z0, z1, args.frames, seeds, steps=steps, clip_denoised=clip))
        record.update(edit="interpolate", latents=list(args.interpolate), frames=args.frames)
        message = f"wrote {args.frames} frames to {out}"
    if model.num_classes:
        label_seeds = seeds[:1].repeat(len(seeds)) if args.interpolate else seeds
        record["labels"] = [int(v) for v in model.labels(label_seeds).cpu()]
    record["seeds"] = [int(s) for s in seeds]
    out.parent.mkdir(parents=True, exist_ok=True)
    cells = row(images)
    Image.fromarray(cells[..., 0] if cells.shape[-1] == 1 else cells).save(out)
    out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    print(message)
    return 0
