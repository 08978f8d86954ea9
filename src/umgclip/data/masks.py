"""COCO mask encodings -> one canonical form: compressed RLE with a ``str`` ``counts``.

COCO stores instance masks as polygons, uncompressed RLE (``counts`` a list of run lengths)
or compressed RLE (``counts`` a string); pycocotools converts all three (C19). We store the
compressed form with ``counts`` decoded to ASCII so the sample JSON stays plain JSON.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils


class MaskError(ValueError):
    """A segmentation cannot be decoded for the given image size."""


def to_rle(segmentation: Any, height: int, width: int) -> dict[str, Any]:
    """Polygon list, uncompressed RLE or compressed RLE -> compressed RLE (``counts`` str).

    Raises:
        MaskError: malformed segmentation or an RLE whose size differs from ``height x width``.
    """
    try:
        if isinstance(segmentation, list):
            polys = [p for p in segmentation if isinstance(p, list) and len(p) >= 6]
            if not polys:
                raise MaskError("polygon segmentation has no polygon with >= 3 points")
            rle = mask_utils.merge(mask_utils.frPyObjects(polys, height, width))
        elif isinstance(segmentation, dict) and "counts" in segmentation:
            size = list(segmentation.get("size", []))
            if size != [height, width]:
                raise MaskError(f"RLE size {size} differs from the image's [{height}, {width}]")
            if isinstance(segmentation["counts"], list):
                rle = mask_utils.frPyObjects(segmentation, height, width)
            else:
                counts = segmentation["counts"]
                rle = {
                    "size": size,
                    "counts": counts.encode("ascii") if isinstance(counts, str) else counts,
                }
        else:
            raise MaskError(f"unknown segmentation type {type(segmentation).__name__}")
    except MaskError:
        raise
    except Exception as e:  # pycocotools raises bare Exceptions/TypeErrors on bad input
        raise MaskError(f"cannot decode segmentation: {e}") from e
    counts = rle["counts"]
    return {
        "size": [int(rle["size"][0]), int(rle["size"][1])],
        "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts,
    }


def encode_mask(mask: np.ndarray) -> dict[str, Any]:
    """Binary (H, W) array -> compressed RLE with ``counts`` str."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {
        "size": [int(rle["size"][0]), int(rle["size"][1])],
        "counts": rle["counts"].decode("ascii"),
    }


def _c(rle: dict[str, Any]) -> dict[str, Any]:
    counts = rle["counts"]
    return {
        "size": list(rle["size"]),
        "counts": counts.encode("ascii") if isinstance(counts, str) else counts,
    }


def decode_rle(rle: dict[str, Any]) -> np.ndarray:
    """Compressed RLE -> bool (H, W) array."""
    return mask_utils.decode(_c(rle)).astype(bool)


def rle_area(rle: dict[str, Any]) -> int:
    return int(mask_utils.area(_c(rle)))


def rle_box_xyxy(rle: dict[str, Any]) -> list[float]:
    """Tight pixel-edge box ``[x0, y0, x1, y1]`` of an RLE mask (pycocotools' toBbox is xywh)."""
    x, y, w, h = (float(v) for v in mask_utils.toBbox(_c(rle)))
    return [x, y, x + w, y + h]


def decode_masks(
    rles: list[dict[str, Any] | None], height: int, width: int, boxes: torch.Tensor | None = None
) -> torch.Tensor:
    """A (K, H, W) bool tensor; a missing mask is filled from its box (documented fallback)."""
    out = torch.zeros((len(rles), height, width), dtype=torch.bool)
    for i, rle in enumerate(rles):
        if rle is not None:
            out[i] = torch.from_numpy(decode_rle(rle))
        elif boxes is not None:
            x0, y0, x1, y1 = boxes[i].tolist()
            out[i, int(np.floor(y0)) : int(np.ceil(y1)), int(np.floor(x0)) : int(np.ceil(x1))] = (
                True
            )
    return out
