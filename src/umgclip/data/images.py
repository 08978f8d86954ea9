"""Safe image decoding: any input image becomes a 3-channel RGB PIL image, or a clear error.

Every path that reads pixels (import, shards, annotation, training) goes through
:func:`decode_image`, so mode handling (C01, C02), decompression bombs (C05) and corrupt files
(C04) are dealt with once.

EXIF orientation is deliberately *not* applied: COCO (and img2dataset) annotations are in the
stored pixel grid, so rotating the pixels would move every box and mask off its object.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile

#: Default pixel limit (width * height) checked from the header before any pixel is decoded.
#: 100 MP covers every real photo dataset (COCO's largest image is 640x640) while refusing
#: bombs whose decoded buffer would take gigabytes.
DEFAULT_MAX_PIXELS = 100_000_000

#: Background that transparent pixels are composited on (architecture.md: white).
BACKGROUND = (255, 255, 255)


class ImageDecodeError(ValueError):
    """An image could not be decoded safely; the message names the sample key."""


@contextlib.contextmanager
def _own_limits() -> Iterator[None]:
    """Switch off PIL's global bomb check and truncated-image leniency; we apply our own rules.

    PIL's check warns or raises depending on a process-global limit; ours is per call and is
    applied from the header before decoding, so PIL's is redundant here.
    """
    old_limit, old_trunc = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
    Image.MAX_IMAGE_PIXELS = None
    # Never accept a partially decoded image: grey bands would silently enter training.
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = old_limit, old_trunc


def _where(key: str) -> str:
    return f" (key {key!r})" if key else ""


def _to_rgb(im: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB; alpha is composited on :data:`BACKGROUND`."""
    if im.mode == "RGB":
        return im
    if im.mode == "P":
        # Palette images may carry transparency in the palette or in info["transparency"].
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # Wide grayscale: PIL's convert("RGB") clips at 255, so rescale to 8 bit by range.
        arr = np.asarray(im, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        im = Image.fromarray(arr.round().astype(np.uint8), mode="L")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    # L, 1, CMYK, YCbCr, LAB, HSV: PIL's converters are exact for these (CMYK JPEGs from Adobe
    # are already un-inverted by the JPEG plugin).
    return im.convert("RGB")


def decode_image(
    data: bytes, key: str = "", max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """Decode encoded image bytes (JPEG, PNG, WebP, ...) to an RGB PIL image.

    Args:
        data: the encoded file.
        key: sample key, used only in error messages.
        max_pixels: refuse images whose header declares more pixels (``None``: no limit).

    Raises:
        ImageDecodeError: empty, truncated or corrupt data, unknown format, or a declared size
            above ``max_pixels`` (checked from the header, before allocating the pixels).
    """
    if not data:
        raise ImageDecodeError(f"empty image data{_where(key)}")
    with _own_limits():
        try:
            im = Image.open(io.BytesIO(data))
        except Exception as e:  # UnidentifiedImageError, OSError, SyntaxError, ...
            raise ImageDecodeError(f"cannot identify image{_where(key)}: {e}") from e
        w, h = im.size
        if w <= 0 or h <= 0:
            raise ImageDecodeError(f"image declares an empty size {w}x{h}{_where(key)}")
        if max_pixels is not None and w * h > max_pixels:
            raise ImageDecodeError(
                f"image declares {w}x{h} = {w * h:,} pixels, above the limit of {max_pixels:,}"
                f"{_where(key)} (decompression-bomb guard; raise max_pixels if intended)"
            )
        try:
            im.load()
            return _to_rgb(im)
        except Exception as e:
            raise ImageDecodeError(f"corrupt or truncated image{_where(key)}: {e}") from e


def read_image_size(data: bytes, key: str = "") -> tuple[int, int]:
    """``(width, height)`` from the header only (no pixel decoding)."""
    with _own_limits():
        try:
            with Image.open(io.BytesIO(data)) as im:
                return im.size
        except Exception as e:
            raise ImageDecodeError(f"cannot identify image{_where(key)}: {e}") from e


def load_image(path: str | Path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Read and decode an image file to RGB (see :func:`decode_image`)."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ImageDecodeError(f"cannot read image file {p}: {e}") from e
    return decode_image(data, key=p.stem, max_pixels=max_pixels)
