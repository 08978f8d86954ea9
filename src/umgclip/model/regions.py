"""Region features from a dense map: box validation, RoIAlign and mask pooling.

Box rule (C17), applied to each ``(K,4)`` xyxy box in pixels of the model input, before any RoI op:

* an image with no boxes (``(0,4)``) gives ``(0,D)``;
* a box partly outside the image is **clipped** to it (not an error);
* a box with a NaN/inf coordinate, inverted (x1 < x0 or y1 < y0), of zero area, or wholly outside
  (zero area after clipping) is **invalid**. With ``on_invalid="raise"`` (the default) that is a
  :class:`BoxError` naming the image, the box and the reason; with ``on_invalid="drop"`` it is
  dropped, counted, and the per-image boolean ``valid`` mask says which input rows the output
  rows are, so no feature is ever attributed to the wrong box.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

log = logging.getLogger(__name__)

#: Boxes smaller than this many pixels on a side count as zero-area.
MIN_BOX_SIZE = 1e-3


class BoxError(ValueError):
    """An invalid box under ``on_invalid="raise"``."""


@dataclass
class CleanBoxes:
    """Boxes of one image after validation."""

    boxes: torch.Tensor  # (K_valid, 4) clipped xyxy
    valid: torch.Tensor  # (K_input,) bool
    reasons: dict[str, int]  # counts of dropped boxes by reason


def validate_boxes(
    boxes: torch.Tensor,
    image_size: tuple[int, int],
    on_invalid: str = "raise",
    image_index: int = 0,
) -> CleanBoxes:
    """Check and clip one image's ``(K,4)`` xyxy pixel boxes (the rule in the module docstring)."""
    if on_invalid not in ("raise", "drop"):
        raise ValueError(f"on_invalid must be 'raise' or 'drop', got {on_invalid!r}")
    if not isinstance(boxes, torch.Tensor):
        boxes = torch.as_tensor(boxes, dtype=torch.float32)
    if boxes.numel() == 0:
        boxes = boxes.reshape(0, 4)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise BoxError(f"image {image_index}: boxes must be (K,4) xyxy, got {tuple(boxes.shape)}")
    b = boxes.float()
    h, w = image_size
    finite = torch.isfinite(b).all(dim=1)
    inverted = finite & ((b[:, 2] < b[:, 0]) | (b[:, 3] < b[:, 1]))
    safe = torch.where(finite[:, None], b, torch.zeros_like(b))
    clipped = torch.stack(
        [
            safe[:, 0].clamp(0, w),
            safe[:, 1].clamp(0, h),
            safe[:, 2].clamp(0, w),
            safe[:, 3].clamp(0, h),
        ],
        dim=1,
    )
    size_ok = ((clipped[:, 2] - clipped[:, 0]) > MIN_BOX_SIZE) & (
        (clipped[:, 3] - clipped[:, 1]) > MIN_BOX_SIZE
    )
    raw_area_ok = ((b[:, 2] - b[:, 0]) > MIN_BOX_SIZE) & ((b[:, 3] - b[:, 1]) > MIN_BOX_SIZE)
    reason_masks = {
        "non_finite": ~finite,
        "inverted": inverted,
        "zero_area": finite & ~inverted & ~raw_area_ok,
        "outside": finite & ~inverted & raw_area_ok & ~size_ok,
    }
    valid = finite & ~inverted & size_ok
    reasons = {k: int(v.sum()) for k, v in reason_masks.items() if int(v.sum())}
    if reasons and on_invalid == "raise":
        bad = int((~valid).nonzero()[0, 0])
        why = next(k for k, v in reason_masks.items() if bool(v[bad]))
        raise BoxError(
            f"image {image_index}: box {bad} {boxes[bad].tolist()} is invalid ({why}) for a "
            f"{h}x{w} image; invalid boxes: {reasons}. Pass on_invalid='drop' to drop them."
        )
    if reasons:
        log.debug("image %d: dropped boxes %s", image_index, reasons)
    return CleanBoxes(boxes=clipped[valid], valid=valid, reasons=reasons)


def roi_pool(
    dense: torch.Tensor,
    boxes: list[torch.Tensor],
    image_size: tuple[int, int],
    output_size: int = 7,
    sampling_ratio: int = -1,
) -> torch.Tensor:
    """Average of ``roi_align(aligned=True)`` over each box: ``(B,C,h,w)`` -> ``(sumK, C)``.

    Boxes are in input pixels; we rescale x and y separately to map cells (``w/W``, ``h/H``)
    and pass ``spatial_scale=1`` because a CNN with "SAME" padding gives ``ceil(H/16)`` rows, so
    one scalar scale would misplace boxes on inputs not divisible by the stride.
    """
    h, w = dense.shape[-2:]
    H, W = image_size
    scale = torch.tensor([w / W, h / H, w / W, h / H], device=dense.device, dtype=torch.float32)
    rois = [bx.to(device=dense.device, dtype=torch.float32) * scale for bx in boxes]
    if sum(r.shape[0] for r in rois) == 0:
        return dense.new_zeros(0, dense.shape[1])
    # roi_align has no bf16 CPU kernel on every build: pool in fp32, cast back.
    pooled = roi_align(
        dense.float(),
        rois,
        output_size=output_size,
        spatial_scale=1.0,
        sampling_ratio=sampling_ratio,
        aligned=True,
    )
    return pooled.mean(dim=(2, 3)).to(dense.dtype)


@dataclass
class CleanMasks:
    """Masks of one image resized to the dense map as pooling weights."""

    weights: torch.Tensor  # (K_valid, h, w) float, each summing to 1
    valid: torch.Tensor  # (K_input,) bool
    dropped_empty: int


def mask_weights(
    masks: torch.Tensor,
    map_size: tuple[int, int],
    on_invalid: str = "raise",
    image_index: int = 0,
) -> CleanMasks:
    """``(K,H,W)`` masks -> area-resized ``(K,h,w)`` pooling weights; empty masks are invalid."""
    if on_invalid not in ("raise", "drop"):
        raise ValueError(f"on_invalid must be 'raise' or 'drop', got {on_invalid!r}")
    if masks.ndim != 3:
        raise ValueError(f"image {image_index}: masks must be (K,H,W), got {tuple(masks.shape)}")
    if masks.shape[0] == 0:
        empty = torch.zeros(0, *map_size)
        return CleanMasks(empty, torch.zeros(0, dtype=torch.bool), 0)
    # Area interpolation = fraction of each map cell the mask covers.
    cover = F.interpolate(masks[:, None].float(), size=map_size, mode="area")[:, 0]
    total = cover.flatten(1).sum(1)
    valid = total > 0
    n_empty = int((~valid).sum())
    if n_empty and on_invalid == "raise":
        bad = int((~valid).nonzero()[0, 0])
        raise ValueError(f"image {image_index}: mask {bad} is empty ({n_empty} empty masks)")
    weights = cover[valid] / total[valid, None, None]
    return CleanMasks(weights, valid, n_empty)


def mask_pool(dense: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted average of one image's ``(C,h,w)`` map under ``(K,h,w)`` weights -> ``(K,C)``."""
    return torch.einsum("khw,chw->kc", weights.to(dense.dtype), dense)
