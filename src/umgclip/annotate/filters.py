"""Quality filter for auto-annotations; every threshold is a :class:`FilterConfig` value and
every decision is counted per rule (the counts go to ``summary.json``).

Rules run cheapest first so expensive stages (masks, region labels) see fewer boxes:
``invalid_box`` (non-finite, or empty after clipping to the image) -> ``box_score`` ->
``min_area`` / ``max_area`` -> ``min_side`` -> ``max_aspect`` -> ``duplicate`` (NMS) ->
``max_regions``; after masking: ``mask_empty`` / ``mask_area`` / ``mask_fill``; after
scoring: ``region_tag_score`` and ``caption_score``.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch
from torchvision.ops import nms

from umgclip.annotate.config import FilterConfig

#: Every rule name that can appear in the counts (kept stable: dashboards read them).
RULES: tuple[str, ...] = (
    "invalid_box",
    "box_score",
    "min_area",
    "max_area",
    "min_side",
    "max_aspect",
    "duplicate",
    "max_regions",
    "mask_empty",
    "mask_area",
    "mask_fill",
    "region_tag_score",
    "caption_score",
)


def clip_boxes(boxes: np.ndarray, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Clip xyxy boxes to the image; returns (clipped boxes, valid mask). A box is invalid when
    a coordinate is NaN/inf or nothing of positive area is left inside the image (C17)."""
    b = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    finite = np.isfinite(b).all(axis=1)
    out = np.where(np.isfinite(b), b, 0.0)
    out[:, [0, 2]] = out[:, [0, 2]].clip(0, width)
    out[:, [1, 3]] = out[:, [1, 3]].clip(0, height)
    valid = finite & (out[:, 2] > out[:, 0]) & (out[:, 3] > out[:, 1])
    return out, valid


def filter_boxes(
    boxes: np.ndarray,
    scores: np.ndarray,
    width: int,
    height: int,
    cfg: FilterConfig,
    counts: Counter | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Apply the geometric and score rules; returns (kept indices best-first, clipped boxes).

    ``scores`` rank boxes for NMS and for the ``max_regions`` cap.
    """
    counts = counts if counts is not None else Counter()
    clipped, valid = clip_boxes(boxes, width, height)
    scores = np.asarray(scores, dtype=np.float32).reshape(-1)
    idx = np.arange(len(clipped))

    def drop(rule: str, keep: np.ndarray) -> None:
        nonlocal idx
        counts[rule] += int((~keep).sum())
        idx = idx[keep]

    drop("invalid_box", valid[idx])
    if cfg.min_box_score is not None:
        drop("box_score", scores[idx] >= cfg.min_box_score)
    b = clipped[idx]
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    area = w * h / float(width * height)
    keep = np.ones(len(idx), bool)
    for rule, ok in (
        ("min_area", area >= cfg.min_area_frac if cfg.min_area_frac is not None else None),
        ("max_area", area <= cfg.max_area_frac if cfg.max_area_frac is not None else None),
        ("min_side", np.minimum(w, h) >= cfg.min_side if cfg.min_side is not None else None),
        (
            "max_aspect",
            np.maximum(w / np.maximum(h, 1e-6), h / np.maximum(w, 1e-6)) <= cfg.max_aspect
            if cfg.max_aspect is not None
            else None,
        ),
    ):
        if ok is None:
            continue
        # A box is charged to the first rule it fails, so the counts add up to the drops.
        counts[rule] += int((keep & ~ok).sum())
        keep &= ok
    idx = idx[keep]
    if cfg.nms_iou is not None and len(idx) > 1:
        order = nms(torch.from_numpy(clipped[idx]), torch.from_numpy(scores[idx]), cfg.nms_iou)
        counts["duplicate"] += len(idx) - len(order)
        idx = idx[order.numpy()]
    else:
        idx = idx[np.argsort(-scores[idx], kind="stable")]
    if cfg.max_regions is not None and len(idx) > cfg.max_regions:
        counts["max_regions"] += len(idx) - cfg.max_regions
        idx = idx[: cfg.max_regions]
    return idx, clipped


def filter_masks(
    masks: np.ndarray,
    boxes: np.ndarray,
    width: int,
    height: int,
    cfg: FilterConfig,
    counts: Counter | None = None,
) -> np.ndarray:
    """Mask quality: drop empty masks, masks below ``min_mask_area_frac`` of the image, and
    masks filling less than ``min_mask_fill`` of their box. Returns kept indices."""
    counts = counts if counts is not None else Counter()
    if len(masks) == 0:
        return np.zeros(0, dtype=np.int64)
    m = np.asarray(masks, dtype=bool).reshape(-1, height, width)
    b = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    area = m.reshape(len(m), -1).sum(axis=1).astype(np.float64)
    box_area = np.maximum((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]), 1e-6)
    keep = np.ones(len(m), bool)
    rules = [("mask_empty", area > 0)]
    if cfg.min_mask_area_frac is not None:
        rules.append(("mask_area", area / float(width * height) >= cfg.min_mask_area_frac))
    if cfg.min_mask_fill is not None:
        rules.append(("mask_fill", area / box_area >= cfg.min_mask_fill))
    for rule, ok in rules:
        counts[rule] += int((keep & ~ok).sum())
        keep &= ok
    return np.flatnonzero(keep)


def filter_scores(
    scores: np.ndarray, threshold: float | None, rule: str, counts: Counter | None = None
) -> np.ndarray:
    """Indices with ``score >= threshold`` (all when the threshold is ``None``)."""
    s = np.asarray(scores, dtype=np.float32).reshape(-1)
    if threshold is None:
        return np.arange(len(s))
    ok = s >= threshold
    if counts is not None:
        counts[rule] += int((~ok).sum())
    return np.flatnonzero(ok)
