"""Box recall of the configured detector + box filters alone (no labeller, no masks), to tune
proposals cheaply: ``python benchmarks/annotate_proposals.py GT_SHARDS [--config YAML]
[--split val] [--set k=v ...]``. Prints recall@0.5 (and @0.7) and boxes per image."""

from __future__ import annotations

import argparse
import json
from collections import Counter

import torch
from torchvision.ops import box_iou

from umgclip.annotate.backends import build_annotator
from umgclip.annotate.config import AnnotateConfig
from umgclip.annotate.filters import filter_boxes
from umgclip.annotate.pipeline import iter_inputs
from umgclip.config import load_config
from umgclip.data.shards import ReadKeys, decode_raw


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("gt")
    ap.add_argument("--config", default="configs/annotate-default.yaml")
    ap.add_argument("--split", default="val")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    cfg = load_config(AnnotateConfig, args.config, args.overrides)
    det = build_annotator("detector", cfg.detector)
    keys = ReadKeys()
    n_gt = 0
    hits = Counter()
    n_boxes = n_img = 0
    counts: Counter = Counter()
    for raw in iter_inputs(args.gt, args.split):
        d = decode_raw(raw, keys)
        w, h = d.image.size
        r = det.detect([d.image])[0]
        keep, clipped = filter_boxes(r.boxes, r.scores, w, h, cfg.filters, counts)
        pred = torch.from_numpy(clipped[keep]).reshape(-1, 4)
        gt = [g.box for g in d.sample.regions if g.kind == "thing" and not g.iscrowd]
        n_img += 1
        n_boxes += len(pred)
        if not gt:
            continue
        n_gt += len(gt)
        if len(pred):
            best = box_iou(torch.tensor(gt), pred).max(dim=1).values.numpy()
            for t in (0.5, 0.7):
                hits[t] += int((best >= t).sum())
    print(
        json.dumps(
            {
                "images": n_img,
                "gt_boxes": n_gt,
                "boxes_per_image": round(n_boxes / max(n_img, 1), 2),
                "recall@0.5": round(hits[0.5] / max(n_gt, 1), 4),
                "recall@0.7": round(hits[0.7] / max(n_gt, 1), 4),
                "filter_counts": dict(counts),
            }
        )
    )


if __name__ == "__main__":
    main()
