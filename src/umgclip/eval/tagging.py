"""Zero-shot multi-label tagging: mean average precision over classes."""

from __future__ import annotations

import torch
from torchmetrics.functional.classification import multilabel_average_precision


def tagging_map(scores: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Macro mAP (percent) over the classes that have at least one positive image.

    Args:
        scores: (N, C) per-image class scores (any monotone score: cosine, logit, prob).
        targets: (N, C) 0/1 ground truth.

    AP is undefined for a class without positives (torchmetrics returns NaN for it with a
    warning); such classes are left out, the common convention for small evaluation sets, and
    ``num_classes`` says how many were averaged.
    """
    if scores.shape != targets.shape or scores.ndim != 2:
        raise ValueError(f"scores {tuple(scores.shape)} and targets {tuple(targets.shape)} differ")
    tgt = targets.long()
    present = tgt.sum(dim=0) > 0
    if not bool(present.any()):
        raise ValueError("no class has a positive example; mAP is undefined")
    ap = multilabel_average_precision(
        scores[:, present].float(), tgt[:, present], num_labels=int(present.sum()), average="none"
    )
    return {
        "mAP": 100.0 * ap.mean().item(),
        "num_images": int(scores.shape[0]),
        "num_classes": int(present.sum()),
    }
