"""``umgclip annotate-eval PRED_DIR GT_DIR``: how good are the auto-annotations against COCO?

- box recall@0.5: share of GT thing boxes (non-crowd) with a predicted box at IoU >= 0.5
  (``torchvision.ops.box_iou``);
- tag precision / recall: predicted image tags (image tags plus region tags) against the
  image's GT categories, names compared after :func:`clean_coco_name` (only equal names match);
- mask IoU: mean ``pycocotools.mask.iou`` between each recalled GT mask and the mask of its
  best-matching predicted box.
Only keys present in both folders are scored (a split's shards are chosen by ``--split``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torchvision.ops import box_iou

from umgclip.annotate.vocab import clean_coco_name
from umgclip.data.schema import Sample
from umgclip.data.shards import iter_raw_samples, list_shards


def read_samples(path: str | Path, split: str | None = None) -> dict[str, Sample]:
    """Sample JSONs of a shard folder by key (images are not decoded)."""
    out = {}
    for raw in iter_raw_samples(list_shards(path, split=split)):
        if "json" in raw.members:
            s = Sample.from_json(raw.members["json"])
            out[s.key] = s
    return out


def _rle(m: dict[str, Any]) -> dict[str, Any]:
    c = m["counts"]
    return {"size": m["size"], "counts": c.encode("ascii") if isinstance(c, str) else c}


def evaluate_annotations(
    pred: dict[str, Sample], gt: dict[str, Sample], iou: float = 0.5
) -> dict[str, Any]:
    """Metrics over keys in both ``pred`` and ``gt`` (see the module docstring)."""
    keys = sorted(set(pred) & set(gt))
    n_gt = n_hit = 0
    tp = n_pred_tags = n_gt_tags = 0
    mask_ious: list[float] = []
    n_pred_regions = 0
    for k in keys:
        p, g = pred[k], gt[k]
        new = [r for r in p.regions if r.source not in {r2.source for r2 in g.regions}]
        n_pred_regions += len(new)
        gt_things = [r for r in g.regions if r.kind == "thing" and not r.iscrowd]
        if gt_things:
            n_gt += len(gt_things)
            if new:
                ious = box_iou(
                    torch.tensor([r.box for r in gt_things]), torch.tensor([r.box for r in new])
                )
                best, idx = ious.max(dim=1)
                for gi, (b, j) in enumerate(zip(best.tolist(), idx.tolist())):
                    if b >= iou:
                        n_hit += 1
                        gm, pm = gt_things[gi].mask, new[j].mask
                        if gm is not None and pm is not None:
                            mask_ious.append(
                                float(mask_utils.iou([_rle(pm)], [_rle(gm)], [0])[0, 0])
                            )
        gt_tags = {clean_coco_name(t) for t in g.tags} | {
            clean_coco_name(t) for r in g.regions for t in r.tags
        }
        annotated = p.source.get("annotate", {})
        pt = set(annotated.get("tag_scores", {})) | {t for r in new for t in r.tags}
        pred_tags = {clean_coco_name(t) for t in pt}
        tp += len(pred_tags & gt_tags)
        n_pred_tags += len(pred_tags)
        n_gt_tags += len(gt_tags)
    return {
        "images": len(keys),
        "gt_boxes": n_gt,
        "pred_regions": n_pred_regions,
        "box_recall@0.5": n_hit / n_gt if n_gt else None,
        "tag_precision": tp / n_pred_tags if n_pred_tags else None,
        "tag_recall": tp / n_gt_tags if n_gt_tags else None,
        "mask_iou_matched": float(np.mean(mask_ious)) if mask_ious else None,
        "matched_masks": len(mask_ious),
    }


def run_eval(pred_dir: str | Path, gt_dir: str | Path, split: str | None = None) -> dict[str, Any]:
    pred = read_samples(pred_dir)
    gt = read_samples(gt_dir, split=split)
    if not set(pred) & set(gt):
        raise ValueError(
            f"no common keys between {pred_dir} ({len(pred)}) and {gt_dir} ({len(gt)})"
        )
    res = evaluate_annotations(pred, gt)
    (Path(pred_dir) / "annotate_eval.json").write_text(json.dumps(res, indent=1))
    return res
