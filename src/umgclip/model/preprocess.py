"""The image transform a :class:`~umgclip.config.PreprocessConfig` describes (PIL -> tensor).

This is the plain, box-unaware transform ``create_model_and_transforms`` returns (open_clip's
shape). Box- and mask-aware geometry for training and region tasks lives in
``umgclip.data.transforms`` and reads the same config.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from umgclip.config import PreprocessConfig

_INTERP = {
    "bicubic": InterpolationMode.BICUBIC,
    "bilinear": InterpolationMode.BILINEAR,
    "nearest": InterpolationMode.NEAREST,
}


class _PadToSquare(torch.nn.Module):
    """Pad right/bottom to ``size`` x ``size`` (so pixel coordinates only scale, never shift)."""

    def __init__(self, size: int, fill: tuple[int, int, int]) -> None:
        super().__init__()
        self.size = size
        self.fill = list(fill)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        h, w = img.shape[-2:]
        return T.functional.pad(img, [0, 0, self.size - w, self.size - h], fill=self.fill)


def _rgb(img: Image.Image) -> Image.Image:
    # Decoding edge cases (alpha, CMYK, palette) are handled by umgclip.data.images; this keeps
    # a PIL image passed directly from crashing on a channel count.
    return img if img.mode == "RGB" else img.convert("RGB")


def build_preprocess(pre: PreprocessConfig) -> Callable[[Image.Image], torch.Tensor]:
    """``PIL.Image -> (3,size,size)`` float tensor normalised with ``pre.mean``/``pre.std``."""
    if pre.interpolation not in _INTERP:
        raise ValueError(f"interpolation must be one of {sorted(_INTERP)}, got {pre.interpolation}")
    interp = _INTERP[pre.interpolation]
    if pre.resize_mode == "shortest":
        geo = [T.Resize(pre.size, interpolation=interp, antialias=True), T.CenterCrop(pre.size)]
    elif pre.resize_mode == "squash":
        geo = [T.Resize((pre.size, pre.size), interpolation=interp, antialias=True)]
    elif pre.resize_mode == "longest":
        geo = [
            T.Resize(pre.size - 1, max_size=pre.size, interpolation=interp, antialias=True),
            _PadToSquare(pre.size, pre.fill),
        ]
    else:
        raise ValueError(f"resize_mode must be shortest/longest/squash, got {pre.resize_mode!r}")
    return T.Compose(
        [
            T.Lambda(_rgb),
            T.ToImage(),
            *geo,
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(mean=list(pre.mean), std=list(pre.std)),
        ]
    )
