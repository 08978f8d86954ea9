"""Builders for test inputs of the data layer (images, shards) — nothing binary is committed."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def image_bytes(w: int, h: int, mode: str = "RGB", fmt: str = "JPEG", seed: int = 0) -> bytes:
    """A random-noise image of the given mode, encoded as ``fmt``."""
    rng = np.random.default_rng(seed)
    base = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
    im = base.convert(mode) if mode != "RGB" else base
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def jpeg_bytes(w: int, h: int, seed: int = 0) -> bytes:
    return image_bytes(w, h, "RGB", "JPEG", seed)


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A plain tar with the given (name, bytes) members, in order."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path
