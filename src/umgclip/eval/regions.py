"""Region recognition: classify given boxes or masks among a closed vocabulary (top-k)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics.functional.classification import multiclass_accuracy


def topk_accuracy(
    scores: torch.Tensor, targets: torch.Tensor, ks: Sequence[int] = (1, 5)
) -> dict[int, float]:
    """Micro top-k accuracy in percent: the fraction of rows whose target is in their top k.

    Args:
        scores: (N, C) class scores per region.
        targets: (N,) class index per region.
    """
    if scores.ndim != 2 or targets.shape != (scores.shape[0],):
        raise ValueError(
            f"scores (N, C) and targets (N,) expected, got {scores.shape}, {targets.shape}"
        )
    if scores.shape[0] == 0:
        raise ValueError("no regions to score")
    c = scores.shape[1]
    out: dict[int, float] = {}
    for k in ks:
        acc = multiclass_accuracy(
            scores.float(), targets.long(), num_classes=c, top_k=min(k, c), average="micro"
        )
        out[k] = 100.0 * acc.item()
    return out
