"""Panoptic-labelled images for adaptation, read from imported shards (the data layer's split).

Images are resized (longest side = ``size``) and padded to a square, the dense tasks' geometry:
the whole image is seen and labels stay pixel-aligned. Everything is decoded once into memory
(the adaptation sets are small: coco_mg has 75 panoptic images).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from umgclip.data.shards import SkipCounter, iter_shard_samples, list_shards

log = logging.getLogger(__name__)

IGNORE = 255


@dataclass
class PanopticItem:
    """One resized, padded image with its labels (all tensors at ``size`` x ``size``)."""

    key: str
    image: torch.Tensor  # (3,S,S) normalised
    semantic: torch.Tensor  # (S,S) long class index, IGNORE where unlabeled or padding
    segments: torch.Tensor  # (S,S) long: index into ``labels`` + 1, 0 = void/padding
    labels: list[int]  # class index per segment
    content: tuple[int, int]  # (h, w) of the image inside the padded square
    orig_size: tuple[int, int] = (0, 0)


@dataclass
class ClassVocab:
    """The classes adaptation trains on: names, thing flags, and which are seen in training."""

    category_ids: list[int]
    names: list[str]
    is_thing: list[bool]
    holdout: list[str] = field(default_factory=list)

    @property
    def index(self) -> dict[int, int]:
        return {c: i for i, c in enumerate(self.category_ids)}

    @property
    def seen(self) -> list[bool]:
        hold = set(self.holdout)
        return [n not in hold for n in self.names]

    @classmethod
    def coco_panoptic(cls, holdout: list[str] | None = None) -> ClassVocab:
        from umgclip.eval.vocab import COCO_PANOPTIC

        vocab = cls(
            [c for c, _, _ in COCO_PANOPTIC],
            [n for _, n, _ in COCO_PANOPTIC],
            [bool(t) for _, _, t in COCO_PANOPTIC],
            list(holdout or []),
        )
        unknown = set(vocab.holdout) - set(vocab.names)
        if unknown:
            raise ValueError(f"holdout classes not in the vocabulary: {sorted(unknown)}")
        return vocab


def resize_pad(
    image: torch.Tensor, size: int, mode: str, fill: float = 0.0
) -> tuple[torch.Tensor, tuple[int, int]]:
    """(C,H,W) -> (C,size,size): longest side to ``size``, pad right/bottom. Returns content (h,w)."""
    h, w = image.shape[-2:]
    s = size / max(h, w)
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    if mode == "nearest":
        out = F.interpolate(image[None].float(), size=(nh, nw), mode="nearest-exact")[0]
    else:
        out = TF.resize(image, [nh, nw], antialias=True)
    out = F.pad(out, (0, size - nw, 0, size - nh), value=fill)
    return out, (nh, nw)


def prepare_image(pil, size: int, mean, std) -> tuple[torch.Tensor, tuple[int, int]]:
    """PIL RGB -> normalised (3,size,size) padded tensor + content (h, w)."""
    x = TF.to_dtype(TF.pil_to_tensor(pil), torch.float32, scale=True)
    x, content = resize_pad(x, size, "bilinear")
    x = TF.normalize(x, list(mean), list(std))
    # Padding is zero in normalised space (= the mean colour), as the model's eval transform pads.
    x[:, content[0] :, :] = 0
    x[:, :, content[1] :] = 0
    return x, content


def load_items(
    shard_dir: str | Path,
    split: str,
    vocab: ClassVocab,
    size: int,
    mean,
    std,
    max_items: int = 0,
    skips: SkipCounter | None = None,
) -> list[PanopticItem]:
    """Every sample of ``split`` that has a panoptic PNG, decoded and resized."""
    skips = skips if skips is not None else SkipCounter()
    paths = list_shards(shard_dir, split)
    if not paths:
        raise FileNotFoundError(f"no {split}-*.tar shards in {shard_dir}")
    index = vocab.index
    items: list[PanopticItem] = []
    for ds in iter_shard_samples(paths, skip_counter=skips):
        if ds.panoptic is None or not ds.sample.panoptic:
            continue
        try:
            items.append(_to_item(ds, index, size, mean, std))
        except (ValueError, KeyError, RuntimeError) as e:
            skips.add("bad_panoptic", ds.sample.key, str(e))
            log.warning("adapt: skipping %s: %s", ds.sample.key, e)
            continue
        if max_items and len(items) >= max_items:
            break
    if skips.total:
        log.warning("adapt data (%s): %s", split, skips.summary())
    return items


def _to_item(ds, index: dict[int, int], size: int, mean, std) -> PanopticItem:
    pan = np.asarray(ds.panoptic)
    if pan.shape != (ds.image.height, ds.image.width):
        raise ValueError(f"panoptic map {pan.shape} != image {(ds.image.height, ds.image.width)}")
    seg_idx = np.zeros(pan.shape, dtype=np.int64)
    labels: list[int] = []
    for s in ds.sample.panoptic["segments"]:
        cls = index.get(int(s["category_id"]))
        if cls is None:
            continue
        m = pan == int(s["id"])
        if not m.any():
            continue
        labels.append(cls)
        seg_idx[m] = len(labels)
    x, content = prepare_image(ds.image, size, mean, std)
    seg, _ = resize_pad(torch.from_numpy(seg_idx)[None], size, "nearest")
    seg = seg[0].long()
    lut = torch.tensor([IGNORE, *labels], dtype=torch.long)
    return PanopticItem(
        ds.sample.key, x, lut[seg], seg, labels, content, (ds.image.height, ds.image.width)
    )
