"""Eval-time preprocessing with the geometry kept, so predictions map back to original pixels.

A thin layer over :func:`umgclip.data.transforms.build_eval_transform` (the same deterministic
transform the model was trained and saved with): it adds :func:`content_box`, where the
original image lies in the model input, which dense predictions need to undo padding/cropping.
"""

from __future__ import annotations

import functools

import torch
from PIL import Image

from umgclip.config import PreprocessConfig
from umgclip.data.transforms import Geometry, RegionTransform, Transformed, build_eval_transform

ContentBox = tuple[float, float, float, float]


@functools.lru_cache(maxsize=8)
def _transform(pre_key: tuple) -> RegionTransform:
    return build_eval_transform(PreprocessConfig(*pre_key))


def _key(pre: PreprocessConfig) -> tuple:
    import dataclasses

    return tuple(tuple(v) if isinstance(v, list) else v for v in dataclasses.astuple(pre))


def prepare(
    image: Image.Image,
    pre: PreprocessConfig,
    boxes: torch.Tensor | None = None,
    masks: torch.Tensor | None = None,
) -> Transformed:
    """Model input plus boxes/masks in input pixels (``keep`` says which regions survived)."""
    return _transform(_key(pre))(image, boxes, masks)


def content_box(g: Geometry) -> ContentBox:
    """The original image's extent (x0, y0, x1, y1) in model-input pixels; it exceeds the input
    where a centre crop cut the image."""
    h, w = g.orig_size
    b = g.boxes_from_original(torch.tensor([[0.0, 0.0, float(w), float(h)]]))[0]
    return (float(b[0]), float(b[1]), float(b[2]), float(b[3]))
