"""Box- and mask-aware preprocessing: the image, its boxes and its masks move together.

Every transform is planned first as a :class:`Geometry` (crop in original pixels, per-axis
scale, padding offset, horizontal flip) and then applied: pixels and masks with
``torchvision.transforms.v2.functional`` (masks as ``tv_tensors.Mask``, so they are resampled
with nearest neighbour), boxes with the Geometry's affine map. Boxes are mapped by the Geometry
rather than as ``tv_tensors.BoundingBoxes`` because v2 clamps them to the canvas, and we need
the unclipped box to measure how much of a region is still visible (regions under
``min_visible`` are dropped and counted). :meth:`Geometry.boxes_to_original` inverts the map so
predictions on the model input land back on the original image (C20).

Sizes (C03): every mode returns exactly ``size x size``; the plan depends only on
``min/max(h, w)``, so portrait and landscape images go through the same logic, and 1-pixel
sides are kept at >= 1 pixel before resizing.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
import torchvision.transforms.v2.functional as F
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode

from umgclip.config import PreprocessConfig

_INTERP = {
    "bicubic": InterpolationMode.BICUBIC,
    "bilinear": InterpolationMode.BILINEAR,
    "nearest": InterpolationMode.NEAREST,
}
RESIZE_MODES = ("shortest", "longest", "squash")


@dataclass
class AugmentConfig:
    """Training augmentation (geometry only; colour jitter does not help CLIP pre-training).

    ``random_resized_crop``: crop a random area fraction in ``scale`` with aspect ratio in
    ``ratio`` (torchvision's sampling rule) and resize it to ``size x size``; otherwise the
    eval geometry of ``PreprocessConfig.resize_mode`` is used. ``hflip``: flip probability.
    """

    random_resized_crop: bool = True
    scale: tuple[float, float] = (0.5, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5


@dataclass
class Geometry:
    """How original pixels map to model-input pixels.

    ``x_out = (x - left) * sx + pad_left`` (then ``W - x_out`` when ``flip``); same for y
    without flip. ``crop = (top, left, height, width)`` in original pixels.
    """

    orig_size: tuple[int, int]  # (h, w)
    out_size: tuple[int, int]  # (H, W)
    crop: tuple[int, int, int, int]
    scale: tuple[float, float]  # (sy, sx)
    pad: tuple[int, int]  # (left, top)
    flip: bool = False

    def boxes_from_original(self, boxes: torch.Tensor) -> torch.Tensor:
        """(K, 4) xyxy original pixels -> model-input pixels (not clipped)."""
        b = boxes.to(torch.float32).reshape(-1, 4)
        top, left, _, _ = self.crop
        sy, sx = self.scale
        x0 = (b[:, 0] - left) * sx + self.pad[0]
        x1 = (b[:, 2] - left) * sx + self.pad[0]
        y0 = (b[:, 1] - top) * sy + self.pad[1]
        y1 = (b[:, 3] - top) * sy + self.pad[1]
        if self.flip:
            w = float(self.out_size[1])
            x0, x1 = w - x1, w - x0
        return torch.stack([x0, y0, x1, y1], dim=1)

    def boxes_to_original(self, boxes: torch.Tensor, clip: bool = True) -> torch.Tensor:
        """(K, 4) xyxy model-input pixels -> original-image pixels (padding/resize/crop undone)."""
        b = boxes.to(torch.float32).reshape(-1, 4)
        x0, y0, x1, y1 = b.unbind(1)
        if self.flip:
            w = float(self.out_size[1])
            x0, x1 = w - x1, w - x0
        top, left, _, _ = self.crop
        sy, sx = self.scale
        out = torch.stack(
            [
                (x0 - self.pad[0]) / sx + left,
                (y0 - self.pad[1]) / sy + top,
                (x1 - self.pad[0]) / sx + left,
                (y1 - self.pad[1]) / sy + top,
            ],
            dim=1,
        )
        if clip:
            h, w = self.orig_size
            out[:, 0::2] = out[:, 0::2].clamp(0, w)
            out[:, 1::2] = out[:, 1::2].clamp(0, h)
        return out


@dataclass
class Transformed:
    """Output of a :class:`RegionTransform`.

    ``keep`` indexes the input regions that survived (so callers can subset tags/texts);
    ``dropped`` counts the regions removed because too little of them stayed visible.
    """

    image: torch.Tensor  # (3, S, S) float, normalised
    boxes: torch.Tensor  # (K', 4) xyxy in image pixels, clipped
    masks: torch.Tensor | None  # (K', S, S) bool
    keep: torch.Tensor  # (K',) long
    geometry: Geometry
    dropped: int = 0


def _random_resized_crop(
    h: int, w: int, aug: AugmentConfig, rng: random.Random
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop sampling rule, drawn from ``rng``.

    Re-implemented (about 15 lines) because torchvision's ``get_params`` draws from torch's
    global RNG; a per-sample seeded stream is what makes a resumed run see the same crops.
    """
    area = h * w
    log_ratio = (math.log(aug.ratio[0]), math.log(aug.ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*aug.scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        cw = int(round(math.sqrt(target * aspect)))
        ch = int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            return rng.randint(0, h - ch), rng.randint(0, w - cw), ch, cw
    in_ratio = w / h
    if in_ratio < min(aug.ratio):
        cw, ch = w, max(1, min(h, int(round(w / min(aug.ratio)))))
    elif in_ratio > max(aug.ratio):
        ch, cw = h, max(1, min(w, int(round(h * max(aug.ratio)))))
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


class RegionTransform:
    """Preprocess an image with its boxes and masks (see module doc). Build it with
    :func:`build_eval_transform` or :func:`build_train_transform`."""

    def __init__(self, pre: PreprocessConfig, aug: AugmentConfig | None = None) -> None:
        if pre.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {pre.resize_mode!r}")
        if pre.interpolation not in _INTERP:
            raise ValueError(
                f"interpolation must be one of {sorted(_INTERP)}, got {pre.interpolation!r}"
            )
        if pre.size < 1:
            raise ValueError(f"size must be >= 1, got {pre.size}")
        self.pre = pre
        self.aug = aug
        self.mean = torch.tensor(pre.mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(pre.std, dtype=torch.float32).view(3, 1, 1)

    def plan(self, h: int, w: int, rng: random.Random | None = None) -> Geometry:
        """The geometry for an ``h x w`` image (random parts drawn from ``rng``)."""
        s = self.pre.size
        rng = rng or random.Random(0)
        pad = (0, 0)
        if self.aug is not None and self.aug.random_resized_crop:
            crop = _random_resized_crop(h, w, self.aug, rng)
            out_hw = (s, s)
        elif self.pre.resize_mode == "shortest":
            side = min(h, w)
            crop = ((h - side) // 2, (w - side) // 2, side, side)
            out_hw = (s, s)
        elif self.pre.resize_mode == "longest":
            crop = (0, 0, h, w)
            k = s / max(h, w)
            out_hw = (max(1, min(s, round(h * k))), max(1, min(s, round(w * k))))
            pad = ((s - out_hw[1]) // 2, (s - out_hw[0]) // 2)
        else:  # squash
            crop = (0, 0, h, w)
            out_hw = (s, s)
        flip = bool(self.aug is not None and self.aug.hflip > 0 and rng.random() < self.aug.hflip)
        scale = (out_hw[0] / crop[2], out_hw[1] / crop[3])
        return Geometry(
            orig_size=(h, w), out_size=(s, s), crop=crop, scale=scale, pad=pad, flip=flip
        )

    def _apply_pixels(
        self, x: torch.Tensor, g: Geometry, interp: InterpolationMode, fill: list[float] | float
    ) -> torch.Tensor:
        top, left, ch, cw = g.crop
        out_hw = [round(ch * g.scale[0]), round(cw * g.scale[1])]
        x = F.resized_crop(x, top, left, ch, cw, out_hw, interpolation=interp, antialias=True)
        if g.pad != (0, 0) or out_hw != list(g.out_size):
            pl, pt = g.pad
            pr, pb = g.out_size[1] - out_hw[1] - pl, g.out_size[0] - out_hw[0] - pt
            x = F.pad(x, [pl, pt, pr, pb], fill=fill)
        if g.flip:
            x = F.horizontal_flip(x)
        return x

    def __call__(
        self,
        image: Image.Image | torch.Tensor,
        boxes: torch.Tensor | None = None,
        masks: torch.Tensor | None = None,
        rng: random.Random | None = None,
        min_visible: float = 0.0,
    ) -> Transformed:
        """Transform ``image`` (PIL RGB or uint8 (3,h,w)), ``boxes`` (K,4) xyxy original pixels
        and ``masks`` (K,h,w) bool together. Regions whose visible fraction (box area inside the
        output / box area) is below ``min_visible`` or that end up empty are dropped."""
        x = F.pil_to_tensor(image) if isinstance(image, Image.Image) else image
        if x.ndim != 3 or x.shape[0] != 3:
            raise ValueError(f"expected an RGB image (3,h,w), got shape {tuple(x.shape)}")
        h, w = int(x.shape[1]), int(x.shape[2])
        g = self.plan(h, w, rng)
        x = self._apply_pixels(
            x, g, _INTERP[self.pre.interpolation], [float(v) for v in self.pre.fill]
        )
        img = (x.to(torch.float32) / 255.0 - self.mean) / self.std

        b = torch.zeros((0, 4)) if boxes is None else boxes.to(torch.float32).reshape(-1, 4)
        if masks is not None and masks.shape[0] != b.shape[0]:
            raise ValueError(f"{masks.shape[0]} masks for {b.shape[0]} boxes")
        mapped = g.boxes_from_original(b)
        H, W = g.out_size
        # Visible part of the box *content*: pad pixels are not content, so measure against the
        # resized image area, not the padded canvas.
        top, left, ch, cw = g.crop
        content = torch.tensor([[left, top, left + cw, top + ch]], dtype=torch.float32)
        ce = g.boxes_from_original(content)[0]
        vis = mapped.clone()
        vis[:, 0::2] = vis[:, 0::2].clamp(float(ce[0]), float(ce[2]))
        vis[:, 1::2] = vis[:, 1::2].clamp(float(ce[1]), float(ce[3]))
        area = (mapped[:, 2] - mapped[:, 0]) * (mapped[:, 3] - mapped[:, 1])
        vis_area = (vis[:, 2] - vis[:, 0]).clamp(min=0) * (vis[:, 3] - vis[:, 1]).clamp(min=0)
        frac = torch.where(area > 0, vis_area / area.clamp(min=1e-12), torch.zeros_like(area))
        ok = (vis_area > 0) & (frac >= min_visible)
        out_masks = None
        if masks is not None:
            out_masks = self.transform_masks(masks[ok], g)
            # A region whose mask vanished in resampling has nothing left to pool.
            nonempty = out_masks.flatten(1).any(1)
            idx_ok = ok.nonzero().flatten()
            ok[idx_ok[~nonempty]] = False
            out_masks = out_masks[nonempty]
        keep = ok.nonzero().flatten()
        final_boxes = (
            torch.stack([vis[keep, 0], vis[keep, 1], vis[keep, 2], vis[keep, 3]], dim=1)
            if keep.numel()
            else torch.zeros((0, 4))
        )
        return Transformed(
            img, final_boxes, out_masks, keep, g, dropped=int(b.shape[0] - keep.numel())
        )

    def transform_masks(self, masks: torch.Tensor, g: Geometry) -> torch.Tensor:
        """(K, h, w) masks of the original image -> (K, S, S) bool masks under geometry ``g``."""
        H, W = g.out_size
        if masks.shape[0] == 0:
            return torch.zeros((0, H, W), dtype=torch.bool)
        m = tv_tensors.Mask(masks.to(torch.uint8))
        out = self._apply_pixels(m, g, InterpolationMode.NEAREST, 0)
        return out.as_subclass(torch.Tensor).bool()

    def image_only(
        self, image: Image.Image | torch.Tensor, rng: random.Random | None = None
    ) -> torch.Tensor:
        """Just the (3, S, S) normalised image tensor (an open_clip-style ``preprocess``)."""
        return self(image, rng=rng).image


def build_eval_transform(pre: PreprocessConfig) -> RegionTransform:
    """Deterministic preprocessing for evaluation and inference."""
    return RegionTransform(pre, None)


def build_train_transform(
    pre: PreprocessConfig, aug_cfg: AugmentConfig | None = None
) -> RegionTransform:
    """Random resized crop + flip for training (``aug_cfg`` defaults to :class:`AugmentConfig`)."""
    return RegionTransform(pre, aug_cfg or AugmentConfig())
