"""Hugging Face ``transformers`` backends, loaded from a local folder or a model id (offline by
default: set ``HF_HUB_OFFLINE=1``; nothing is downloaded unless the caller allows it).

- :class:`HFOwlDetector`: OWLv2 / OWL-ViT open-vocabulary boxes. OWLv2 pads every image to a
  square (bottom/right) before resizing; the processor's ``post_process_grounded_object_detection``
  undoes that when given the original ``(height, width)``, and we clip to the image (C20).
- :class:`HFSamMasker`: SAM masks prompted by boxes; ``post_process_masks`` maps the low-res
  masks back through the resize and padding to the original size.
- :class:`HFBlipCaptioner`: BLIP / BLIP-2 captions for images and (as crops) for regions.
- :class:`HFClipScorer`: CLIP tags over a vocabulary, region labels on crops, and scores.

Inference runs under ``torch.no_grad()`` with optional bf16 autocast on CPU (DESIGN section 7:
autocast is only fast outside ``inference_mode``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image

from umgclip.annotate.annotators import (
    Detections,
    ImageCaptioner,
    ImageTagger,
    MaskGenerator,
    RegionCaptioner,
    RegionDetector,
    RegionLabeller,
    Scorer,
    Tag,
)


def _autocast(device: str, bf16: bool) -> contextlib.AbstractContextManager:
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


def _to(inputs: Any, device: str) -> Any:
    return inputs.to(device) if hasattr(inputs, "to") else inputs


def crop_boxes(image: Image.Image, boxes: np.ndarray, min_side: int = 2) -> list[Image.Image]:
    """Crops of ``image`` at integer-rounded ``boxes`` (at least ``min_side`` pixels a side)."""
    w, h = image.size
    crops = []
    for x0, y0, x1, y1 in np.asarray(boxes, dtype=np.float32).reshape(-1, 4):
        x_lo, t = int(np.floor(max(0.0, x0))), int(np.floor(max(0.0, y0)))
        r, b = int(np.ceil(min(float(w), x1))), int(np.ceil(min(float(h), y1)))
        r, b = max(r, min(w, x_lo + min_side)), max(b, min(h, t + min_side))
        crops.append(image.crop((x_lo, t, r, b)))
    return crops


def tag_box_crops(
    images: list[Image.Image],
    boxes: list[np.ndarray],
    tag_crops: Callable[[list[Image.Image]], list[list[Tag]]],
) -> list[list[list[Tag]]]:
    """Region labels by tagging each box's crop: per image, per box, its tags."""
    out = []
    for im, b in zip(images, boxes):
        crops = crop_boxes(im, b)
        out.append(tag_crops(crops) if crops else [])
    return out


class HFOwlDetector(RegionDetector):
    """OWLv2 / OWL-ViT via ``AutoModelForZeroShotObjectDetection``.

    Options: ``threshold`` (score, default 0.1), ``queries`` (explicit list of names; default:
    the pipeline vocabulary), ``max_queries`` (first N names of the vocabulary; text queries
    cost one text-tower pass each), ``prompt`` (``"a photo of a {}"``), ``bf16``.
    """

    name = "hf.owl"
    open_vocabulary = True

    def __init__(
        self,
        model: str,
        device: str = "cpu",
        threshold: float = 0.1,
        queries: list[str] | None = None,
        max_queries: int | None = 133,
        prompt: str = "a photo of a {}",
        bf16: bool = False,
    ) -> None:
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

        self.processor = AutoProcessor.from_pretrained(model)
        self.model = AutoModelForZeroShotObjectDetection.from_pretrained(model).to(device).eval()
        self.device, self.threshold, self.bf16 = device, threshold, bf16
        self.queries, self.max_queries, self.prompt = queries, max_queries, prompt
        self.name = f"hf.owl:{model}"

    def _names(self, vocabulary: list[str] | None) -> list[str]:
        names = list(self.queries or vocabulary or [])
        if not names:
            raise ValueError(
                "the OWL detector needs text queries: give options.queries or a vocabulary"
            )
        return names[: self.max_queries] if self.max_queries else names

    @torch.no_grad()
    def detect(
        self, images: list[Image.Image], vocabulary: list[str] | None = None
    ) -> list[Detections]:
        if not images:
            return []
        names = self._names(vocabulary)
        texts = [[self.prompt.format(n) for n in names]] * len(images)
        inputs = _to(
            self.processor(text=texts, images=images, truncation=True, return_tensors="pt"),
            self.device,
        )
        with _autocast(self.device, self.bf16):
            outputs = self.model(**inputs)
        sizes = [(im.size[1], im.size[0]) for im in images]
        results = self.processor.post_process_grounded_object_detection(
            outputs, threshold=self.threshold, target_sizes=sizes
        )
        out = []
        for im, res in zip(images, results):
            boxes = res["boxes"].float().cpu().numpy().reshape(-1, 4)
            w, h = im.size
            # Padding boxes can extend past the real image (into the padded area): clip.
            boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, w)
            boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, h)
            labels = [names[int(i)] for i in res["labels"].cpu().tolist()]
            out.append(Detections(boxes, res["scores"].float().cpu().numpy(), labels))
        return out


class HFSamMasker(MaskGenerator):
    """SAM (``SamModel``) prompted by each box; one mask per box (``multimask_output=False``).

    Options: ``mask_threshold`` (on the upsampled logits, default 0.0), ``bf16``. Images are
    run one at a time because SAM's processor needs the same number of boxes for every image.
    """

    name = "hf.sam"

    def __init__(
        self, model: str, device: str = "cpu", mask_threshold: float = 0.0, bf16: bool = False
    ) -> None:
        from transformers import SamModel, SamProcessor

        self.processor = SamProcessor.from_pretrained(model)
        self.model = SamModel.from_pretrained(model).to(device).eval()
        self.device, self.mask_threshold, self.bf16 = device, mask_threshold, bf16
        self.name = f"hf.sam:{model}"

    @torch.no_grad()
    def masks(self, images: list[Image.Image], boxes: list[np.ndarray]) -> list[np.ndarray]:
        out = []
        for im, b in zip(images, boxes):
            w, h = im.size
            b = np.asarray(b, dtype=np.float32).reshape(-1, 4)
            if len(b) == 0:
                out.append(np.zeros((0, h, w), dtype=bool))
                continue
            inputs = self.processor(images=im, input_boxes=[b.tolist()], return_tensors="pt")
            original, reshaped = inputs.pop("original_sizes"), inputs.pop("reshaped_input_sizes")
            inputs = _to(inputs, self.device)
            with _autocast(self.device, self.bf16):
                pred = self.model(**inputs, multimask_output=False).pred_masks
            masks = self.processor.image_processor.post_process_masks(
                pred.float().cpu(), original, reshaped, mask_threshold=self.mask_threshold
            )[0]
            out.append(masks[:, 0].numpy().astype(bool))
        return out


class HFBlipCaptioner(ImageCaptioner, RegionCaptioner):
    """BLIP / BLIP-2 captions (``AutoModelForImageTextToText``, falling back to
    ``BlipForConditionalGeneration``). Options: ``max_new_tokens`` (30), ``num_beams`` (1),
    ``prompt`` (conditional captioning prefix, default none), ``bf16``."""

    name = "hf.blip"

    def __init__(
        self,
        model: str,
        device: str = "cpu",
        max_new_tokens: int = 30,
        num_beams: int = 1,
        prompt: str | None = None,
        bf16: bool = False,
    ) -> None:
        from transformers import AutoProcessor, BlipForConditionalGeneration

        self.processor = AutoProcessor.from_pretrained(model)
        try:
            from transformers import AutoModelForImageTextToText

            self.model = AutoModelForImageTextToText.from_pretrained(model)
        except (ValueError, KeyError, ImportError):
            self.model = BlipForConditionalGeneration.from_pretrained(model)
        self.model = self.model.to(device).eval()
        self.device, self.bf16 = device, bf16
        self.gen = {"max_new_tokens": max_new_tokens, "num_beams": num_beams}
        self.prompt = prompt
        self.name = f"hf.blip:{model}"

    @torch.no_grad()
    def caption(self, images: list[Image.Image]) -> list[list[str]]:
        if not images:
            return []
        kw: dict[str, Any] = {"images": images, "return_tensors": "pt"}
        if self.prompt:
            kw["text"] = [self.prompt] * len(images)
        inputs = _to(self.processor(**kw), self.device)
        with _autocast(self.device, self.bf16):
            ids = self.model.generate(**inputs, **self.gen)
        texts = self.processor.batch_decode(ids, skip_special_tokens=True)
        return [[t.strip()] for t in texts]

    def caption_regions(
        self, images: list[Image.Image], boxes: list[np.ndarray]
    ) -> list[list[str]]:
        out = []
        for im, b in zip(images, boxes):
            crops = crop_boxes(im, b)
            out.append([c[0] for c in self.caption(crops)] if crops else [])
        return out


class HFClipScorer(ImageTagger, RegionLabeller, Scorer):
    """CLIP (``CLIPModel`` or any ``AutoModel`` with ``get_image_features`` /
    ``get_text_features``): image tags by similarity to a vocabulary, region labels on crops,
    image-text and region-text cosine scores.

    Options: ``prompt`` (``"a photo of a {}."``), ``topk`` (tags per image, 5), ``bf16``,
    ``text_cache`` (vocabulary embedding cache folder; ``auto`` or ``null`` = memory only).
    """

    name = "hf.clip"

    def __init__(
        self,
        model: str,
        device: str = "cpu",
        vocabulary: list[str] | None = None,
        prompt: str = "a photo of a {}.",
        topk: int = 5,
        bf16: bool = False,
        text_cache: str | None = "auto",
    ) -> None:
        from transformers import AutoModel, AutoProcessor

        self.processor = AutoProcessor.from_pretrained(model)
        self.model = AutoModel.from_pretrained(model).to(device).eval()
        self.device, self.bf16, self.prompt, self.topk = device, bf16, prompt, topk
        self.vocabulary = list(vocabulary or [])
        self._vocab_emb: torch.Tensor | None = None
        self.text_cache = text_cache
        self.name = f"hf.clip:{model}"

    @staticmethod
    def _features(out: Any) -> torch.Tensor:
        # transformers 5 returns a ModelOutput (pooler_output = projected features); 4.x a tensor.
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    @torch.no_grad()
    def encode_images(self, images: list[Image.Image]) -> torch.Tensor:
        inputs = _to(self.processor(images=images, return_tensors="pt"), self.device)
        with _autocast(self.device, self.bf16):
            f = self._features(self.model.get_image_features(**inputs))
        return torch.nn.functional.normalize(f.float(), dim=-1)

    @torch.no_grad()
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        inputs = _to(
            self.processor(text=texts, return_tensors="pt", padding=True, truncation=True),
            self.device,
        )
        with _autocast(self.device, self.bf16):
            f = self._features(self.model.get_text_features(**inputs))
        return torch.nn.functional.normalize(f.float(), dim=-1)

    def _vocab(self) -> torch.Tensor:
        if not self.vocabulary:
            raise ValueError("CLIP tagging needs a vocabulary")
        if self._vocab_emb is None:
            from umgclip.annotate.text_cache import (
                cache_key,
                cached_text_embeddings,
                module_fingerprint,
            )

            texts = [self.prompt.format(v) for v in self.vocabulary]
            key = cache_key(module_fingerprint(self.model), texts, bf16=self.bf16, kind="hf.clip")
            self._vocab_emb = cached_text_embeddings(self.encode_texts, texts, key, self.text_cache)
        return self._vocab_emb

    def _tags(self, emb: torch.Tensor, k: int) -> list[list[Tag]]:
        sims = emb @ self._vocab().T
        top = sims.topk(min(k, sims.shape[1]), dim=1)
        return [
            [Tag(self.vocabulary[i], float(s)) for s, i in zip(vs.tolist(), ix.tolist())]
            for vs, ix in zip(top.values, top.indices)
        ]

    def tag(self, images: list[Image.Image]) -> list[list[Tag]]:
        return self._tags(self.encode_images(images), self.topk) if images else []

    def label_regions(
        self, images: list[Image.Image], boxes: list[np.ndarray]
    ) -> list[list[list[Tag]]]:
        return tag_box_crops(images, boxes, lambda c: self._tags(self.encode_images(c), self.topk))

    def image_text(self, images: list[Image.Image], texts: list[list[str]]) -> list[np.ndarray]:
        out = []
        emb = self.encode_images(images) if images else None
        for i, t in enumerate(texts):
            out.append((self.encode_texts(t) @ emb[i]).numpy() if t else np.zeros(0, np.float32))
        return out

    def region_text(
        self, images: list[Image.Image], boxes: list[np.ndarray], texts: list[list[str]]
    ) -> list[np.ndarray]:
        out = []
        for im, b, t in zip(images, boxes, texts):
            crops = crop_boxes(im, b)
            if not crops:
                out.append(np.zeros(0, np.float32))
                continue
            out.append((self.encode_images(crops) * self.encode_texts(t)).sum(-1).numpy())
        return out
