"""Drawing helpers (matplotlib): images with boxes, masks and labels.

Functions take an ``Axes`` and draw onto it so callers can compose figures (e.g. ground truth
next to predictions); :func:`show_sample` is the ``umgclip data show`` figure.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # file output only; never needs a display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402


def distinct_colors(n: int) -> np.ndarray:
    """``n`` visually distinct RGB colours in [0, 1] (tab20, then hsv when more are needed)."""
    if n <= 20:
        return np.asarray(plt.get_cmap("tab20").colors[:n]).reshape(-1, 3)
    return np.asarray(plt.get_cmap("hsv")(np.linspace(0, 1, n, endpoint=False)))[:, :3]


def draw_regions(
    ax: Axes,
    image: np.ndarray,
    boxes: np.ndarray | Sequence[Sequence[float]],
    labels: Sequence[str] | None = None,
    masks: np.ndarray | Sequence[np.ndarray | None] | None = None,
    alpha: float = 0.45,
    linestyle: str = "-",
) -> None:
    """Draw ``image`` (H, W, 3 uint8) with xyxy ``boxes``, optional (K, H, W) masks and labels;
    region ``i`` gets colour ``i`` for its box, mask and label."""
    image = np.asarray(image)
    boxes = np.asarray(boxes, dtype=float).reshape(-1, 4)
    colors = distinct_colors(len(boxes))
    canvas = image.astype(float) / 255.0
    if masks is not None:
        for m, col in zip(masks, colors):
            if m is None:
                continue
            m = np.asarray(m, dtype=bool)
            canvas[m] = (1 - alpha) * canvas[m] + alpha * col
    ax.imshow(canvas)
    for i, (b, col) in enumerate(zip(boxes, colors)):
        x0, y0, x1, y1 = b
        ax.add_patch(
            plt.Rectangle(
                (x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=col, lw=1.5, ls=linestyle
            )
        )
        if labels is not None and i < len(labels):
            ax.text(
                x0,
                y0,
                labels[i],
                fontsize=6,
                color="white",
                va="bottom",
                bbox={"facecolor": col, "alpha": 0.8, "pad": 1, "lw": 0},
            )
    ax.set_axis_off()


def show_sample(
    image: np.ndarray,
    boxes: np.ndarray,
    labels: Sequence[str],
    masks: Sequence[np.ndarray | None] | None,
    title: str,
    out: str | Path,
) -> Path:
    """Save one annotated image (boxes + masks + labels, ``title`` above) as a PNG."""
    h, w = image.shape[:2]
    fig, ax = plt.subplots(figsize=(max(4.0, w / 100), max(3.0, h / 100) + 0.8), dpi=120)
    draw_regions(ax, image, boxes, labels, masks)
    ax.set_title(title, fontsize=7, wrap=True, loc="left")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def figure_size(
    width: int, height: int, base: float = 7.0, extra: float = 0.6
) -> tuple[float, float]:
    """A matplotlib figure size for an image: ``base`` inches on the long side, the short side
    kept at least a fifth of it. Extreme aspect ratios (a 1x1000 image) would otherwise ask for a
    canvas thousands of inches long and tens of GB of memory."""
    ratio = min(max(height / max(width, 1), 0.2), 5.0)
    if ratio <= 1:
        return base, base * ratio + extra
    return base / ratio, base + extra
