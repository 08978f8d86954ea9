"""Weight-free region proposals and masks (scikit-image), so the default pipeline gives real
regions on a fresh machine with no network.

- :class:`SelectiveSearchProposer`: Felzenszwalb superpixels at a few scales, grouped
  hierarchically by colour, size and fill similarity as in selective search (Uijlings et al.,
  IJCV 2013). Every group on the way up the hierarchy is a box proposal. scikit-image has the
  superpixels but no selective-search grouping (and OpenCV's ximgproc is not installed), hence
  the ~60 lines of grouping below.
- :class:`SuperpixelMasker`: a mask per box = the superpixels that lie (mostly) inside the box.
  An object's own superpixels sit inside its box while background superpixels spill over the
  box edges, so this separates them without a learned model. Cheaper and more predictable than
  random-walker or Chan-Vese per box; it cannot split an object from a same-coloured neighbour.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from skimage.color import rgb2lab
from skimage.segmentation import felzenszwalb

from umgclip.annotate.annotators import Detections, MaskGenerator, RegionDetector

_BINS = 25


def _downscale(image: Image.Image, max_side: int) -> tuple[np.ndarray, float, float]:
    """RGB uint8 array with the longer side at most ``max_side``; returns (array, sx, sy) where
    ``original = small * (sx, sy)``."""
    w, h = image.size
    s = min(1.0, max_side / max(w, h))
    sw, sh = max(1, round(w * s)), max(1, round(h * s))
    small = image.convert("RGB").resize((sw, sh), Image.BILINEAR) if (sw, sh) != (w, h) else image
    return np.asarray(small.convert("RGB")), w / sw, h / sh


def _superpixels(arr: np.ndarray, scale: float, sigma: float, min_size: int) -> np.ndarray:
    return felzenszwalb(arr, scale=scale, sigma=sigma, min_size=min_size).astype(np.int32)


def _colour_hist(lab: np.ndarray, labels: np.ndarray, n: int) -> np.ndarray:
    """Per-region L1-normalised colour histograms (3 channels x _BINS), shape (n, 3*_BINS)."""
    lo = np.array([0.0, -128.0, -128.0])
    hi = np.array([100.0, 127.0, 127.0])
    q = np.clip(((lab - lo) / (hi - lo) * _BINS).astype(np.int64), 0, _BINS - 1)
    flat = labels.reshape(-1)
    hist = np.zeros((n, 3 * _BINS))
    for c in range(3):
        np.add.at(hist, (flat, c * _BINS + q[..., c].reshape(-1)), 1.0)
    return hist / np.maximum(hist.sum(axis=1, keepdims=True), 1.0)


def hierarchical_grouping(labels: np.ndarray, lab: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Selective-search grouping of a superpixel map.

    Returns (boxes (R,4) xyxy in ``labels`` pixels with exclusive max, sizes (R,)) for every
    initial and merged region. Similarity = colour histogram intersection + size + fill terms.
    """
    h, w = labels.shape
    n = int(labels.max()) + 1
    total = float(h * w)
    ys, xs = np.mgrid[0:h, 0:w]
    flat = labels.reshape(-1)
    size = np.bincount(flat, minlength=n).astype(np.float64)
    order = np.argsort(flat, kind="stable")
    starts = _starts(flat, n)
    sx, sy = xs.reshape(-1)[order], ys.reshape(-1)[order]
    box = np.stack(
        [
            np.minimum.reduceat(sx, starts),
            np.minimum.reduceat(sy, starts),
            np.maximum.reduceat(sx, starts) + 1,
            np.maximum.reduceat(sy, starts) + 1,
        ],
        axis=1,
    ).astype(np.float64)
    hist = list(_colour_hist(lab, labels, n))
    sizes = list(size)
    boxes = list(box)
    nbrs: dict[int, set[int]] = {i: set() for i in range(n)}
    pairs = np.concatenate(
        [
            np.stack([labels[:, :-1].reshape(-1), labels[:, 1:].reshape(-1)], 1),
            np.stack([labels[:-1].reshape(-1), labels[1:].reshape(-1)], 1),
        ]
    )
    pairs = np.unique(np.sort(pairs[pairs[:, 0] != pairs[:, 1]], axis=1), axis=0)
    for a, b in pairs:
        nbrs[int(a)].add(int(b))
        nbrs[int(b)].add(int(a))

    def sim(i: int, j: int) -> float:
        bi, bj = boxes[i], boxes[j]
        ub = (max(bi[2], bj[2]) - min(bi[0], bj[0])) * (max(bi[3], bj[3]) - min(bi[1], bj[1]))
        colour = np.minimum(hist[i], hist[j]).sum() / 3.0
        size_s = 1.0 - (sizes[i] + sizes[j]) / total
        fill = 1.0 - (ub - sizes[i] - sizes[j]) / total
        return colour + size_s + fill

    s = {(min(a, b), max(a, b)): sim(int(a), int(b)) for a, b in pairs}
    while s:
        (i, j) = max(s, key=s.get)
        k = len(sizes)
        sizes.append(sizes[i] + sizes[j])
        hist.append((hist[i] * sizes[i] + hist[j] * sizes[j]) / sizes[k])
        bi, bj = boxes[i], boxes[j]
        boxes.append(
            np.array([min(bi[0], bj[0]), min(bi[1], bj[1]), max(bi[2], bj[2]), max(bi[3], bj[3])])
        )
        new_n = (nbrs.pop(i) | nbrs.pop(j)) - {i, j}
        for key in [p for p in s if i in p or j in p]:
            del s[key]
        nbrs[k] = new_n
        for m in new_n:
            nbrs[m] -= {i, j}
            nbrs[m].add(k)
            s[(m, k)] = sim(m, k)
    return np.array(boxes, dtype=np.float32), np.array(sizes, dtype=np.float32)


def _starts(flat_labels: np.ndarray, n: int) -> np.ndarray:
    """Start offsets of each label's run in ``sort(flat_labels)`` (felzenszwalb labels are
    0..n-1 without gaps, so every run is non-empty)."""
    counts = np.bincount(flat_labels, minlength=n)
    return np.concatenate([[0], np.cumsum(counts)[:-1]])


class SelectiveSearchProposer(RegionDetector):
    """Class-agnostic box proposals; ``score`` = how much of its box a group fills (compact,
    object-like groups first) times ``(box area / image area) ** size_power``: with
    ``size_power`` 0 the many tiny superpixel boxes (which fill their box best) crowd out
    object-sized groups under a ``max_regions`` cap; a small positive power favours larger
    groups. Options: ``max_side`` (working resolution), ``scales`` (Felzenszwalb ``scale``
    values), ``sigma``, ``min_size`` (pixels at working resolution), ``max_proposals``,
    ``size_power``."""

    name = "classical.selective_search"

    def __init__(
        self,
        max_side: int = 192,
        scales: tuple[float, ...] | list[float] = (200.0, 500.0),
        sigma: float = 0.8,
        min_size: int = 60,
        max_proposals: int = 200,
        size_power: float = 0.0,
    ) -> None:
        self.max_side = max_side
        self.scales = tuple(float(s) for s in scales)
        self.sigma = sigma
        self.min_size = min_size
        self.max_proposals = max_proposals
        self.size_power = float(size_power)

    def _one(self, image: Image.Image) -> Detections:
        arr, sx, sy = _downscale(image, self.max_side)
        lab = rgb2lab(arr)
        all_boxes, all_scores = [], []
        for scale in self.scales:
            labels = _superpixels(arr, scale, self.sigma, self.min_size)
            boxes, sizes = hierarchical_grouping(labels, lab)
            area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
            all_boxes.append(boxes)
            fill = sizes / np.maximum(area, 1.0)
            all_scores.append(fill * (area / float(labels.size)) ** self.size_power)
        boxes = np.concatenate(all_boxes) * np.array([sx, sy, sx, sy], dtype=np.float32)
        scores = np.concatenate(all_scores)
        boxes, uniq = np.unique(np.round(boxes, 2), axis=0, return_index=True)
        scores = scores[uniq]
        order = np.argsort(-scores, kind="stable")[: self.max_proposals]
        return Detections(boxes[order], scores[order])

    def detect(
        self, images: list[Image.Image], vocabulary: list[str] | None = None
    ) -> list[Detections]:
        return [self._one(im) for im in images]


class SuperpixelMasker(MaskGenerator):
    """A mask per box from Felzenszwalb superpixels. Options: ``max_side``, ``scale``,
    ``sigma``, ``min_size``, ``inside_frac`` (a superpixel joins the mask when at least this
    share of it lies inside the box; retried at 0.5 when nothing qualifies)."""

    name = "classical.superpixel_mask"

    def __init__(
        self,
        max_side: int = 256,
        scale: float = 150.0,
        sigma: float = 0.8,
        min_size: int = 30,
        inside_frac: float = 0.8,
    ) -> None:
        self.max_side = max_side
        self.scale = scale
        self.sigma = sigma
        self.min_size = min_size
        self.inside_frac = inside_frac

    def _one(self, image: Image.Image, boxes: np.ndarray) -> np.ndarray:
        w, h = image.size
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        if len(boxes) == 0:
            return np.zeros((0, h, w), dtype=bool)
        arr, sx, sy = _downscale(image, self.max_side)
        labels = _superpixels(arr, self.scale, self.sigma, self.min_size)
        sh, sw = labels.shape
        n = int(labels.max()) + 1
        size = np.bincount(labels.reshape(-1), minlength=n)
        # Pixel centres of the original grid mapped into the small grid, to upsample by lookup.
        col = np.minimum(((np.arange(w) + 0.5) / sx).astype(np.int64), sw - 1)
        row = np.minimum(((np.arange(h) + 0.5) / sy).astype(np.int64), sh - 1)
        out = np.zeros((len(boxes), h, w), dtype=bool)
        for k, (x0, y0, x1, y1) in enumerate(boxes):
            c0, c1 = int(np.floor(x0 / sx)), int(np.ceil(x1 / sx))
            r0, r1 = int(np.floor(y0 / sy)), int(np.ceil(y1 / sy))
            inside = np.bincount(labels[r0:r1, c0:c1].reshape(-1), minlength=n)
            frac = inside / np.maximum(size, 1)
            chosen = frac >= self.inside_frac
            if not chosen.any():
                chosen = frac >= 0.5
            small = chosen[labels]
            full = small[row[:, None], col[None, :]]
            bx = np.zeros((h, w), dtype=bool)
            bx[int(np.floor(y0)) : int(np.ceil(y1)), int(np.floor(x0)) : int(np.ceil(x1))] = True
            out[k] = full & bx
        return out

    def masks(self, images: list[Image.Image], boxes: list[np.ndarray]) -> list[np.ndarray]:
        return [self._one(im, b) for im, b in zip(images, boxes)]
