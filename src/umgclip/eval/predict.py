"""Open-vocabulary prediction on one image: tags, labelled boxes and a segmentation map.

``predict(model, image, labels, boxes)`` returns a plain dict (what ``umgclip predict`` writes
as JSON) plus the label map. Boxes are given and returned in original image pixels; they go
through the same preprocessing geometry as the image and the results map back.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from umgclip.eval.evaluate import EvalConfig, EvalContext, dense_preprocess, predict_label_map
from umgclip.eval.geometry import prepare


@dataclass
class Prediction:
    """``result`` is JSON-ready; ``label_map`` (H, W) indexes ``result["labels"]``."""

    result: dict[str, Any]
    label_map: np.ndarray


def parse_labels(text: str) -> list[str]:
    """``"cat, dog ,tree"`` -> ``["cat", "dog", "tree"]`` (empty items dropped, order kept,
    duplicates removed: the same class twice would split its score)."""
    out: list[str] = []
    for t in text.split(","):
        t = t.strip()
        if t and t not in out:
            out.append(t)
    if not out:
        raise ValueError("--labels needs at least one non-empty label, e.g. 'cat,dog,sky'")
    return out


def _box_problem(box: Sequence[float], size: tuple[int, int]) -> str | None:
    """Why a box (xyxy, original pixels) cannot be labelled, or None when it can."""
    x0, y0, x1, y1 = box
    if not all(math.isfinite(v) for v in box):
        return "NaN or infinite coordinate"
    if x1 < x0 or y1 < y0:
        return "inverted box (x1 < x0 or y1 < y0; xyxy expected)"
    if x1 == x0 or y1 == y0:
        return "zero-area box"
    w, h = size
    if x1 <= 0 or y1 <= 0 or x0 >= w or y0 >= h:
        return "outside the image"
    return None


def read_boxes(path: str | Path) -> list[list[float]]:
    """Boxes from JSON: ``[[x0,y0,x1,y1], ...]`` or ``[{"box": [...]}, ...]`` (original pixels)."""
    data = json.loads(Path(path).read_text())
    if isinstance(data, dict) and "boxes" in data:
        data = data["boxes"]
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a list of boxes")
    boxes = []
    for i, b in enumerate(data):
        b = b.get("box") if isinstance(b, dict) else b
        if not (isinstance(b, (list, tuple)) and len(b) == 4):
            raise ValueError(f"{path}: box {i} must be [x0, y0, x1, y1], got {b!r}")
        boxes.append([float(v) for v in b])
    return boxes


def predict(
    model: torch.nn.Module,
    image: Image.Image,
    labels: Sequence[str],
    boxes: Sequence[Sequence[float]] | None = None,
    cfg: EvalConfig | None = None,
    top_k: int = 5,
    ctx: EvalContext | None = None,
) -> Prediction:
    """Tags (softmax over ``labels`` at the model's logit scale, plus cosine), a label per box
    (encode_boxes) and a per-pixel label map (encode_dense), for one RGB image. Pass the same
    ``ctx`` for several images to encode the label prompts only once."""
    labels = list(labels)
    model.eval()
    if ctx is None or ctx.model is not model:
        ctx = EvalContext(model=model, shards=[], cfg=cfg or EvalConfig())
    cls = ctx.class_embeddings(labels)
    scale = float(model.logit_scale_value().detach())
    pre = model.preprocess_cfg
    x = prepare(image, pre).image[None].to(ctx.device)
    with ctx.autocast():
        img = torch.nn.functional.normalize(model.encode_image(x).float().cpu(), dim=-1)
    cos = (img @ cls.T)[0]
    prob = (scale * cos).softmax(-1)
    order = prob.argsort(descending=True).tolist()
    result: dict[str, Any] = {
        "size": [image.width, image.height],
        "labels": labels,
        "tags": [
            {"label": labels[i], "score": float(prob[i]), "cosine": float(cos[i])} for i in order
        ],
        "boxes": [],
    }
    if boxes:
        given = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
        # Each unusable box is reported with its own reason and the others still get labels
        # (C17): never a whole-run failure for one bad row, never a feature from the wrong place.
        reasons = [_box_problem(row, image.size) for row in given.tolist()]
        usable = [i for i, r in enumerate(reasons) if r is None]
        t = prepare(image, dense_preprocess(model), given[usable])
        kept_local = set(t.keep.tolist())
        kept = {usable[j] for j in kept_local}
        for j, i in enumerate(usable):
            if j not in kept_local:
                reasons[i] = "too little of it is visible after preprocessing"
        b = given
        emb: list[torch.Tensor] = []
        if len(t.boxes):
            with ctx.autocast():
                emb = model.encode_boxes(t.image[None].to(ctx.device), [t.boxes.to(ctx.device)])
        rows = iter(emb[0].float().cpu() if emb else [])
        back = t.geometry.boxes_to_original(t.boxes)
        backs = iter(back.tolist())
        for i, orig in enumerate(b.tolist()):
            if i not in kept:
                result["boxes"].append({"box": orig, "label": None, "error": reasons[i]})
                continue
            e = torch.nn.functional.normalize(next(rows), dim=-1)
            c = e @ cls.T
            p = (scale * c).softmax(-1)
            top = p.argsort(descending=True)[: min(top_k, len(labels))].tolist()
            result["boxes"].append(
                {
                    "box": orig,
                    "box_used": [round(v, 2) for v in next(backs)],
                    "label": labels[top[0]],
                    "score": float(p[top[0]]),
                    "top": [{"label": labels[j], "score": float(p[j])} for j in top],
                }
            )
    lm = predict_label_map(ctx, [image], cls)[0].numpy()
    counts = np.bincount(lm.reshape(-1), minlength=len(labels)) / lm.size
    result["segmentation"] = {
        labels[i]: round(float(counts[i]), 4) for i in np.argsort(-counts) if counts[i] > 0
    }
    return Prediction(result=result, label_map=lm)
