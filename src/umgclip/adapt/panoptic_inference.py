"""Panoptic prediction on one image at its original resolution, and an overlay with a legend
(``umgclip predict --task panoptic`` calls these)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from umgclip.adapt.data import prepare_image
from umgclip.adapt.evaluate import inference_context


@dataclass
class PanopticPrediction:
    """``segmentation`` (H,W) int segment ids at the original size (0 = void); ``segments``:
    dicts with ``id``, ``category`` (class index), ``name``, ``isthing``, ``score``, ``area``."""

    segmentation: np.ndarray
    segments: list[dict]


def predict_panoptic(
    model, image: Image.Image, open_vocab: bool | None = None, precision: str = "bf16"
) -> PanopticPrediction:
    """Run an adapted panoptic model (:func:`umgclip.adapt.load_adapted`) on a PIL image."""
    image = image.convert("RGB")
    pre = model.backbone.preprocess_cfg
    x, (h, w) = prepare_image(image, model.cfg.data.size, pre.mean, pre.std)
    dev = model.class_emb.device
    with inference_context(dev, precision):
        res = model.predict_panoptic_batch(x[None].to(dev), open_vocab=open_vocab)[0]
    seg = res.segmentation[:h, :w][None, None].float()
    seg = F.interpolate(seg, size=(image.height, image.width), mode="nearest-exact")[0, 0]
    seg = seg.to(torch.int64).cpu().numpy()
    segments = []
    for s in res.segments:
        area = int((seg == s["id"]).sum())
        if area:
            segments.append({**s, "name": model.vocab.names[s["category"]], "area": area})
    return PanopticPrediction(seg, segments)


def draw_panoptic(
    image: Image.Image, pred: PanopticPrediction, out_path: str | Path, alpha: float = 0.55
) -> Path:
    """Save the image with each segment tinted in its own colour and a legend of class names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    from umgclip.viz import figure_size

    rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    over = rgb.copy()
    cmap = plt.get_cmap("tab20")
    handles = []
    for i, s in enumerate(sorted(pred.segments, key=lambda s: -s["area"])):
        color = np.array(cmap(i % 20)[:3])
        m = pred.segmentation == s["id"]
        over[m] = (1 - alpha) * rgb[m] + alpha * color
        label = f"{s['name']} ({s['score']:.2f})" if "score" in s else s["name"]
        handles.append(Patch(color=color, label=label))
    fig, ax = plt.subplots(figsize=figure_size(image.width, image.height, base=8.0, extra=0.5))
    ax.imshow(over)
    ax.axis("off")
    if handles:
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, bbox_inches="tight", dpi=100)
    plt.close(fig)
    return out
