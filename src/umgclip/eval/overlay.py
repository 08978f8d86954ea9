"""Prediction overlays: the image with its segmentation, labelled boxes, tags and a legend."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from umgclip.viz import distinct_colors, figure_size, plt


def draw_prediction(
    image: Image.Image,
    result: dict[str, Any],
    label_map: np.ndarray,
    out: str | Path | None = None,
    title: str = "",
    ax: Any = None,
    max_tags: int = 3,
    alpha: float = 0.5,
) -> Any:
    """Draw one prediction (from :func:`umgclip.eval.predict.predict`) on ``ax`` or into
    ``out`` (PNG). Colours are per label, shared by the segmentation, boxes and legend."""
    labels = result["labels"]
    # Colours go to the labels actually shown (largest segments first, then box labels), so a
    # 133-class vocabulary still gets 20 clearly distinct colours where it matters.
    shown = list(result.get("segmentation", {}))
    shown += [b["label"] for b in result.get("boxes", []) if b.get("label") not in (None, *shown)]
    palette = distinct_colors(20)
    colors = np.full((len(labels), 3), 0.5)
    for rank, lab in enumerate(dict.fromkeys(shown)):
        if lab in labels:
            colors[labels.index(lab)] = palette[rank] if rank < 20 else (0.5, 0.5, 0.5)
    rgb = np.asarray(image.convert("RGB"), dtype=float) / 255.0
    seg = colors[label_map]
    canvas = (1 - alpha) * rgb + alpha * seg
    own = ax is None
    if own:
        h, w = label_map.shape
        fig, ax = plt.subplots(figsize=figure_size(w, h), dpi=110)
    ax.imshow(canvas)
    for b in result.get("boxes", []):
        if b.get("label") is None:
            continue
        x0, y0, x1, y1 = b["box"]
        col = colors[labels.index(b["label"])]
        ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec=col, lw=2))
        ax.text(
            x0,
            y0,
            f"{b['label']} {b['score']:.2f}",
            fontsize=7,
            color="white",
            va="bottom",
            bbox={"facecolor": col, "alpha": 0.85, "pad": 1, "lw": 0},
        )
    tags = ", ".join(f"{t['label']} {t['score']:.2f}" for t in result["tags"][:max_tags])
    ax.set_title((title + "\n" if title else "") + f"tags: {tags}", fontsize=8)
    present = [lab for lab in result.get("segmentation", {}) if lab in labels]
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[labels.index(lab)]) for lab in present[:10]]
    if handles:
        ax.legend(
            handles,
            [f"{lab} {result['segmentation'][lab]:.0%}" for lab in present[:10]],
            fontsize=6,
            loc="lower right",
            framealpha=0.7,
        )
    ax.set_axis_off()
    if own:
        fig.tight_layout()
        if out is not None:
            fig.savefig(out)
        plt.close(fig)
    return ax
