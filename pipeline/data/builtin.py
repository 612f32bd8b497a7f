"""Datasets generated locally, with no download: ``builtin:shapes10``, ``builtin:shapes10_anycolour``.

``shapes10``: RGB images (32x32 by default, any resolution) of one coloured shape on a plain
background, 10 labelled classes. Class ``c`` fixes the shape and its hue; each sample jitters
position, size, shade and background. Image ``i`` depends only on ``(seed, i)``, so any subset
and any shard layout of the dataset is the same data, at any size. Shapes are rendered on a 4x
supersampled grid and box-filtered, which gives smooth edges a small U-Net learns in minutes.

``shapes10_anycolour``: the same ten shapes, but the class is the shape alone: hue, shade and
background are drawn at random for every image (as are position and size), so no colour or
single pixel tells the class. A linear classifier on raw pixels (or their principal components)
is then well below 100% (it must find the shape at any position), which makes it a baseline
a learned representation can be measured against (``evaluation.probe``).

Captions (:func:`builtin_caption`, for text-conditioned models such as unCLIP): each sample has an
English caption that names its colour and shape ("a red circle") and, with wording that varies per
sample, what else is true of that image: its size ("a small red circle"), its height in the frame
("a red circle near the top") and the dark background ("a large red circle on black"). The
wording is drawn from its own random stream of ``(seed, index)``, so captions never move the
images. Left/right are never named: the training reader flips images horizontally.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "BUILTIN_DATASETS",
    "SHAPES10_ANYCOLOUR_CLASSES",
    "SHAPES10_CLASSES",
    "builtin_caption",
    "builtin_image",
    "builtin_label",
    "shapes10_batch",
    "shapes10_image",
    "shapes10_label",
]

SHAPES10_CLASSES = (
    "red_circle",
    "green_square",
    "blue_triangle",
    "yellow_diamond",
    "magenta_ring",
    "cyan_plus",
    "orange_cross",
    "purple_frame",
    "white_bar",
    "pink_two_dots",
)

# Base colour of each class (RGB in [0, 1]).
_COLOURS = np.array(
    [
        [0.90, 0.15, 0.15],
        [0.15, 0.80, 0.25],
        [0.20, 0.35, 0.95],
        [0.95, 0.85, 0.15],
        [0.90, 0.20, 0.85],
        [0.15, 0.85, 0.90],
        [1.00, 0.55, 0.10],
        [0.55, 0.25, 0.85],
        [0.95, 0.95, 0.95],
        [1.00, 0.55, 0.70],
    ]
)

_SUPERSAMPLE = 4


def _mask(label: int, x: np.ndarray, y: np.ndarray, s: float) -> np.ndarray:
    """Boolean mask of class ``label``'s shape of half-size ``s`` centred at the origin."""
    ax, ay = np.abs(x), np.abs(y)
    r = np.sqrt(x * x + y * y)
    t = s * 0.32  # stroke half-width
    if label == 0:
        return r <= s
    if label == 1:
        return np.maximum(ax, ay) <= s * 0.85
    if label == 2:  # upward triangle: below the two slanted edges, above the base
        return (y >= -s * 0.75) & (y <= s - 2.0 * ax * 0.95)
    if label == 3:
        return ax + ay <= s
    if label == 4:
        return (r <= s) & (r >= s * 0.55)
    if label == 5:
        return ((ax <= t) & (ay <= s)) | ((ay <= t) & (ax <= s))
    if label == 6:
        d1, d2 = np.abs(x - y) / np.sqrt(2.0), np.abs(x + y) / np.sqrt(2.0)
        return ((d1 <= t) | (d2 <= t)) & (np.maximum(ax, ay) <= s * 0.85)
    if label == 7:
        m = np.maximum(ax, ay)
        return (m <= s * 0.85) & (m >= s * 0.85 - 1.2 * t)
    if label == 8:
        return (ay <= t * 1.2) & (ax <= s)
    if label == 9:
        d = s * 0.55
        return (np.sqrt((x - d) ** 2 + y * y) <= s * 0.42) | (np.sqrt((x + d) ** 2 + y * y) <= s * 0.42)
    raise ValueError(f"label: {label!r} is not allowed; shapes10 has classes 0..9")


def shapes10_label(index: int, seed: int = 0) -> int:
    """Class of sample ``index``: classes cycle, so every 10 consecutive samples are balanced."""
    return int((index + seed) % 10)


def shapes10_image(index: int, seed: int = 0, resolution: int = 32, any_colour: bool = False) -> np.ndarray:
    """Sample ``index`` of ``builtin:shapes10`` as an (R, R, 3) uint8 array (``any_colour``: of
    ``builtin:shapes10_anycolour``, a random hue per image)."""
    if index < 0:
        raise ValueError(f"index: {index!r} is not allowed; it must be >= 0")
    if resolution < 8:
        raise ValueError(f"resolution: {resolution!r} is not allowed; shapes10 needs >= 8")
    p = _shapes10_params(index, seed, any_colour)
    n = resolution * _SUPERSAMPLE
    grid = (np.arange(n) + 0.5) / n * 2.0 - 1.0  # pixel centres in [-1, 1]
    yy, xx = np.meshgrid(grid, grid, indexing="ij")
    yy = -yy  # y points up
    mask = _mask(p["label"], xx - p["cx"], yy - p["cy"], p["size"]).astype(np.float32)
    # Box filter the supersampled mask: anti-aliased coverage per output pixel.
    cover = mask.reshape(resolution, _SUPERSAMPLE, resolution, _SUPERSAMPLE).mean(axis=(1, 3))[..., None]
    image = cover * p["shade"] + (1.0 - cover) * p["background"]
    return np.round(image * 255.0).astype(np.uint8)


def _shapes10_params(index: int, seed: int, any_colour: bool) -> dict:
    """What sample ``index`` shows: label, half-size, centre, shape colour, background colour, hue."""
    label = shapes10_label(index, seed)
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(index), 0x5A9E])
    size = rng.uniform(0.45, 0.7)
    cx, cy = rng.uniform(-0.9 + size, 0.9 - size, size=2)
    colour_rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(index), 0xC01])
    shade = np.clip(_COLOURS[label] * rng.uniform(0.8, 1.05) + rng.normal(0.0, 0.03, size=3), 0.0, 1.0)
    background = np.clip(rng.uniform(0.05, 0.3) + rng.normal(0.0, 0.03, size=3), 0.0, 1.0)
    hue = None
    if any_colour:  # the class is the shape alone: a random saturated hue, a random dark background
        hue = colour_rng.uniform(0.0, 1.0)
        shade = _hue_rgb(hue) * colour_rng.uniform(0.6, 1.0)
        background = colour_rng.uniform(0.0, 0.3, size=3)
    return {"label": label, "size": size, "cx": cx, "cy": cy, "shade": shade, "background": background, "hue": hue}


# Caption words of each class: (colour, shape noun phrase); the colour of shapes10_anycolour is named
# from its hue instead (_HUE_NAMES: the hexcone's hue in twelfths, wrapped).
_CAPTION_WORDS = (
    ("red", "circle"),
    ("green", "square"),
    ("blue", "triangle"),
    ("yellow", "diamond"),
    ("magenta", "ring"),
    ("cyan", "plus sign"),
    ("orange", "cross"),
    ("purple", "frame"),
    ("white", "bar"),
    ("pink", "pair of dots"),
)
_HUE_NAMES = ("red", "orange", "yellow", "yellow", "green", "green", "cyan", "cyan", "blue", "purple",
              "magenta", "red")
_TEMPLATES = (
    "{a} {colour} {shape}",
    "{a} {size} {colour} {shape}",
    "{a} {colour} {shape} {where}",
    "{a} {size} {colour} {shape} on black",
    "a photo of {a} {colour} {shape}",
    "a picture of {a} {size} {colour} {shape} {where}",
    "{colour} {shape}, {size}, {where}",
    "{a} {colour} {shape} on a dark background",
)


def builtin_caption(name: str, index: int, seed: int = 0) -> str:
    """Caption of sample ``index`` of ``builtin:NAME`` (see the module docstring)."""
    _check_name(name)
    p = _shapes10_params(index, seed, name == "shapes10_anycolour")
    colour, shape = _CAPTION_WORDS[p["label"]]
    if p["hue"] is not None:
        colour = _HUE_NAMES[int(p["hue"] * 12) % 12]
    size = "small" if p["size"] < 0.53 else "large" if p["size"] > 0.62 else "medium-sized"
    where = "near the top" if p["cy"] > 0.12 else "near the bottom" if p["cy"] < -0.12 else "in the middle"
    wording = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(index), 0xCA9]).integers(len(_TEMPLATES))
    words = {"colour": colour, "shape": shape, "size": size, "where": where}
    text = _TEMPLATES[wording].format(a="{a}", **words)
    first = text.split("{a} ", 1)[1] if "{a} " in text else ""
    return text.replace("{a}", "an" if first[:1] in "aeiou" and first else "a")


def _hue_rgb(hue: float) -> np.ndarray:
    """A fully saturated colour of ``hue`` in [0, 1) (the HSV hexcone with S = V = 1)."""
    k = (np.array([5.0, 3.0, 1.0]) + hue * 6.0) % 6.0
    return 1.0 - np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)


def builtin_label(name: str, index: int, seed: int = 0) -> int:
    """Class of sample ``index`` of ``builtin:NAME`` (both variants: the shape cycles through 0..9)."""
    _check_name(name)
    return shapes10_label(index, seed)


def builtin_image(name: str, index: int, seed: int = 0, resolution: int = 32) -> np.ndarray:
    """Sample ``index`` of ``builtin:NAME`` as an (R, R, 3) uint8 array."""
    _check_name(name)
    return shapes10_image(index, seed, resolution, any_colour=name == "shapes10_anycolour")


def _check_name(name: str) -> None:
    if name not in BUILTIN_DATASETS:
        raise ValueError(f"builtin dataset: {name!r} is not allowed; expected one of {', '.join(BUILTIN_DATASETS)}")


def shapes10_batch(start: int, stop: int, seed: int = 0, resolution: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Samples ``start..stop-1`` as ((N, R, R, 3) uint8 images, (N,) int64 labels)."""
    images = np.stack([shapes10_image(i, seed, resolution) for i in range(start, stop)]) if stop > start else (
        np.zeros((0, resolution, resolution, 3), np.uint8)
    )
    labels = np.array([shapes10_label(i, seed) for i in range(start, stop)], dtype=np.int64)
    return images, labels


# The class names of shapes10_anycolour: the shapes, without their shapes10 colour.
SHAPES10_ANYCOLOUR_CLASSES = tuple(name.split("_", 1)[1] for name in SHAPES10_CLASSES)

BUILTIN_DATASETS = {"shapes10": SHAPES10_CLASSES, "shapes10_anycolour": SHAPES10_ANYCOLOUR_CLASSES}
