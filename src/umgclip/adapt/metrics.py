"""Metrics of adapted models: mIoU (confusion matrix from torchmetrics) and PQ/SQ/RQ
(torchmetrics ``PanopticQuality``)."""

from __future__ import annotations

import torch
from torchmetrics.classification import MulticlassConfusionMatrix
from torchmetrics.detection import PanopticQuality


class MeanIoU:
    """Accumulates a confusion matrix; mIoU is the mean over classes with a non-empty union
    (ground truth or prediction), the mmsegmentation convention."""

    def __init__(self, num_classes: int, ignore_index: int = 255):
        self.cm = MulticlassConfusionMatrix(num_classes, ignore_index=ignore_index)
        self.num_classes = num_classes

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        self.cm.update(pred.flatten().cpu(), target.flatten().cpu().long())

    def per_class(self) -> torch.Tensor:
        cm = self.cm.compute().double()
        inter = cm.diag()
        union = cm.sum(0) + cm.sum(1) - inter
        return torch.where(union > 0, inter / union.clamp_min(1), torch.nan)

    def compute(self, classes: list[int] | None = None) -> float:
        iou = self.per_class()
        if classes is not None:
            iou = iou[torch.as_tensor(classes, dtype=torch.long)]
        return float(iou.nanmean()) if torch.isfinite(iou).any() else float("nan")


def panoptic_to_pairs(seg: torch.Tensor, segments: list[dict], fill_category: int) -> torch.Tensor:
    """(H,W) segment ids + segment dicts -> (H,W,2) (category, instance id) for torchmetrics.
    Pixels of id 0 or of unknown segments become ``(fill_category, 0)``: the meter's ``void`` for
    ground truth, its ``unpredicted`` pseudo-class for predictions (see :class:`PanopticMeter`)."""
    out = torch.zeros((*seg.shape, 2), dtype=torch.long)
    out[..., 0] = fill_category
    for s in segments:
        m = seg == s["id"]
        out[m, 0] = int(s["category"])
        out[m, 1] = int(s["id"])
    return out


class PanopticMeter:
    """PQ, SQ, RQ over all classes and over given class subsets (torchmetrics per-class PQ)."""

    def __init__(self, things: list[int], stuffs: list[int]):
        self.things, self.stuffs = sorted(things), sorted(stuffs)
        # torchmetrics skips a ground-truth segment that is mostly *void in the prediction*
        # (COCO's panopticapi counts it as a false negative): a model that predicts nothing would
        # get no FN at all. Unpredicted pixels therefore get their own pseudo stuff class
        # ``unpredicted``, which COCO semantics need and which is left out of every mean.
        self.unpredicted = max(self.things + self.stuffs) + 1
        self.void = self.unpredicted + 1
        self.metric = PanopticQuality(
            self.things, [*self.stuffs, self.unpredicted], return_sq_and_rq=True,
            return_per_class=True, allow_unknown_preds_category=True,
        )  # fmt: skip

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """``pred``/``target`` (H,W,2) pairs from :func:`panoptic_to_pairs`."""
        self.metric.update(pred[None], target[None])

    def compute(self, subset: list[int] | None = None) -> dict[str, float]:
        """Mean PQ/SQ/RQ over the classes seen in ground truth or predictions (or ``subset``)."""
        per = self.metric.compute()  # (C, 3) in sorted(things + stuffs) order
        cats = sorted([*self.things, *self.stuffs, self.unpredicted])
        stats = self.metric
        # Classes with no TP+FP+FN are excluded, as in COCO; so is the pseudo-class.
        present = (stats.true_positives + stats.false_positives + stats.false_negatives) > 0
        keep = present & torch.tensor([c != self.unpredicted for c in cats])
        if subset is not None:
            sub = set(subset)
            keep &= torch.tensor([c in sub for c in cats])
        if not keep.any():
            return {"PQ": float("nan"), "SQ": float("nan"), "RQ": float("nan"), "n": 0}
        vals = per.reshape(len(cats), 3)[keep].double().mean(0)
        return {
            "PQ": float(vals[0]),
            "SQ": float(vals[1]),
            "RQ": float(vals[2]),
            "n": int(keep.sum()),
        }
