"""Reconstruction from a representation model's code: encode images, sample from their codes.

``launch/sample.py --model EXPORT --from-images DIR`` calls :func:`reconstruction_grid`: each image
of DIR is encoded by the model's encoder (z = E_phi(x0)), and ``per_image`` samples are drawn from
the network conditioned on z, each from its own seed (``evaluation.seeds.sample_seed(seed, k)`` for
the k-th sample of the image), with the model's sampler (a view that conditions on codes). What
the samples share with their image is what the code keeps (a time-dependent encoder's code
E_phi(x0, t) is computed at every network call, at the time the sampler is at).
:func:`interpolation_row` decodes codes
on the segment between two images' codes with one seed (Abstreiter et al. 2021, sec. 5:
interpolating in the representation space).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from evaluation.model_sampling import SamplerSettings, from_uint8, to_uint8
from evaluation.seeds import sample_seeds
from pipeline.diffusion import registry

__all__ = ["encode_folder", "interpolation_row", "read_images", "reconstruction_grid", "sample_from_codes",
           "sample_from_images"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def read_images(folder: str | Path, resolution: int, limit: int | None = None) -> np.ndarray:
    """(N, R, R, 3) uint8: the images of ``folder`` in name order, centre-cropped and resized to R."""
    from PIL import Image

    from pipeline.data.images import center_crop_resize

    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"--from-images: {str(folder)!r} is not a folder of images")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
    if not files:
        raise ValueError(f"--from-images: {str(folder)!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    images = []
    for path in files:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"))
        images.append(array if array.shape[:2] == (resolution, resolution) else center_crop_resize(array, resolution))
    return np.stack(images)


def _view(model):
    view = model.view()
    if not hasattr(view, "with_code"):
        with_codes = [n for n, s in registry.OBJECTIVES.items() if s.view_type is not None
                      and hasattr(s.view_type, "with_code")]
        raise ValueError(f"--from-images: the model's objective {model.diffusion.objective!r} has no encoder; "
                         f"allowed: a model of objective {', '.join(with_codes)}")
    return view


@torch.no_grad()
def encode_folder(model, images: np.ndarray, device, t: torch.Tensor | None = None) -> torch.Tensor:
    """The codes z = E_phi(x0) of (N, H, W, C) uint8 images, (N, d); a time-dependent encoder's at the
    network time input ``t``."""
    return _view(model).encode(from_uint8(images, device), t)


@torch.no_grad()
def _draw(model, conditioned, n: int, seeds: np.ndarray, settings: SamplerSettings, device,
          batch_size: int) -> np.ndarray:
    """One uint8 sample per row: ``conditioned(lo, hi)`` is the view given rows lo:hi's codes."""
    config = model.network.config
    shape = (int(config.in_channels), int(config.image_size), int(config.image_size))
    registry.check_sampler_fits(model.diffusion.objective, settings.sampler,
                                options=model.diffusion.objective_options())
    opts = registry.sampler_options(settings.sampler, settings.as_dict())
    out = []
    for lo in range(0, n, batch_size):
        hi = min(lo + batch_size, n)
        sb = torch.as_tensor(np.asarray(seeds[lo:hi], np.int64))
        x = registry.sample(conditioned(lo, hi), settings.sampler, (hi - lo, *shape), sb, steps=settings.steps,
                            options=opts, device=device)
        out.append(to_uint8(x))
    return np.concatenate(out)


def sample_from_codes(model, z: torch.Tensor, seeds: np.ndarray, settings: SamplerSettings, device,
                      batch_size: int = 64) -> np.ndarray:
    """One uint8 sample per (code, seed) row, drawn from the network conditioned on that code."""
    view = _view(model)
    return _draw(model, lambda lo, hi: view.with_code(z[lo:hi].to(device)), len(z), seeds, settings, device,
                 batch_size)


def sample_from_images(model, images: np.ndarray, seeds: np.ndarray, settings: SamplerSettings, device,
                       batch_size: int = 64) -> np.ndarray:
    """One uint8 sample per (image, seed) row, drawn from the network conditioned on the image's code
    (E_phi(x0), or E_phi(x0, t) at every network call for a time-dependent encoder)."""
    view = _view(model)
    x0 = from_uint8(images, device)
    return _draw(model, lambda lo, hi: view.with_images(x0[lo:hi]), len(images), seeds, settings, device,
                 batch_size)


def reconstruction_grid(model, images: np.ndarray, per_image: int, settings: SamplerSettings, seed: int,
                        device, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, seeds)``: rows (N, 1 + per_image, H, W, C), each an input image then ``per_image``
    samples from its code; sample k of every image uses seed ``sample_seed(seed, k)``."""
    seeds = sample_seeds(seed, np.arange(per_image))
    samples = sample_from_images(model, np.repeat(images, per_image, axis=0), np.tile(seeds, len(images)),
                                 settings, device, batch_size)
    samples = samples.reshape(len(images), per_image, *samples.shape[1:])
    return np.concatenate([images[:, None], samples], axis=1), seeds


@torch.no_grad()
def interpolation_row(model, a: np.ndarray, b: np.ndarray, steps: int, settings: SamplerSettings, seed: int,
                      device) -> np.ndarray:
    """(steps + 2, H, W, C): image a, samples from (1 - s) z_a + s z_b for s in [0, 1] (one seed), image b.
    For a time-dependent encoder the codes are interpolated at every network call:
    (1 - s) E_phi(a, t) + s E_phi(b, t)."""
    view = _view(model)
    pair = from_uint8(np.stack([a, b]), device)
    s = torch.linspace(0, 1, steps, device=pair.device)[:, None]
    seeds = np.full(steps, sample_seeds(seed, np.arange(1))[0])

    if view.time_dependent:
        def between(lo: int, hi: int):  # rows lo:hi, as a function of their network time input t
            a_rows, b_rows, w = pair[:1].expand(hi - lo, -1, -1, -1), pair[1:].expand(hi - lo, -1, -1, -1), s[lo:hi]
            return view.with_code(lambda t: (1 - w) * view.encode(a_rows, t) + w * view.encode(b_rows, t))

        samples = _draw(model, between, steps, seeds, settings, device, batch_size=64)
    else:
        z = view.encode(pair)
        samples = sample_from_codes(model, (1 - s) * z[:1] + s * z[1:], seeds, settings, device)
    return np.concatenate([a[None], samples, b[None]])
