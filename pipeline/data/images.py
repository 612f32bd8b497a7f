"""Image encoding for shards and the decode-side geometry (centre crop, resize, flip)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

__all__ = ["IMAGE_EXTENSIONS", "IMAGE_FORMATS", "center_crop_resize", "decode_image", "encode_image"]

# Shard member extension per format, and every extension the reader accepts as "the image".
IMAGE_FORMATS = {"png": "png", "jpg": "jpg", "webp": "webp"}
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")


def encode_image(image: np.ndarray, image_format: str = "png", quality: int = 95) -> bytes:
    """(H, W, 3) uint8 -> encoded bytes; ``png`` is lossless, ``jpg``/``webp`` use ``quality``."""
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format: {image_format!r} is not allowed; use one of {sorted(IMAGE_FORMATS)}")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image: expected an (H, W, 3) uint8 array, got {image.dtype} {tuple(image.shape)}")
    buf = io.BytesIO()
    pil = Image.fromarray(image, "RGB")
    if image_format == "png":
        pil.save(buf, format="PNG", compress_level=6)
    elif image_format == "jpg":
        pil.save(buf, format="JPEG", quality=quality, subsampling=0)
    else:
        pil.save(buf, format="WEBP", quality=quality, method=4)
    return buf.getvalue()


def decode_image(data: bytes) -> np.ndarray:
    """Encoded bytes -> (H, W, 3) uint8 RGB; raises on anything PIL cannot fully decode."""
    with Image.open(io.BytesIO(data)) as pil:
        pil.load()
        if pil.mode != "RGB":
            pil = pil.convert("RGB")
        return np.asarray(pil, dtype=np.uint8)


def center_crop_resize(image: np.ndarray, resolution: int) -> np.ndarray:
    """Crop the central square of (H, W, 3) uint8 and resize it to ``resolution`` (bicubic)."""
    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    image = image[top : top + side, left : left + side]
    if side == resolution:
        return np.ascontiguousarray(image)
    pil = Image.fromarray(np.ascontiguousarray(image), "RGB")
    # Halve with a box filter while far too big (cheap, alias-free), then one bicubic step.
    while min(*pil.size) >= 2 * resolution:
        pil = pil.reduce(2)
    return np.asarray(pil.resize((resolution, resolution), Image.BICUBIC), dtype=np.uint8)
