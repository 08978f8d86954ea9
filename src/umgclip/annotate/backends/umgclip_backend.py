"""umgclip's own model as image tagger, region labeller and quality scorer (open vocabulary).

Images go through a "longest side + pad right/bottom" resize so the whole image is seen and a
box maps to model pixels by a per-axis scale only; region embeddings come from
``encode_boxes`` (RoIAlign on the dense map, context kept), texts from ``encode_text`` with
the prompt ``"a photo of a {}."``. Scores are cosine similarities.
"""

from __future__ import annotations

import contextlib
import logging

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from umgclip.annotate.annotators import ImageTagger, RegionLabeller, Scorer, Tag
from umgclip.annotate.text_cache import cache_key, cached_text_embeddings, module_fingerprint

log = logging.getLogger(__name__)


class UMGCLIPBackend(ImageTagger, RegionLabeller, Scorer):
    """Options: ``prompt``, ``topk`` (tags per image/region, 5), ``bf16`` (autocast under
    no_grad, default true on CPU), ``text_batch`` (texts per text-tower call, 256),
    ``text_cache`` (folder for cached vocabulary embeddings; ``auto``: ``$UMGCLIP_CACHE``,
    ``null``: memory only).

    Without ``pretrained`` (and when ``model`` is a registry name, not a saved model folder)
    the model is built from its registry config: its towers may be
    pretrained but the projections into the shared space are untrained, so its similarities
    mean nothing. Such a backend sets ``trained = False``; the pipeline then records its scores
    but never filters on them, and warns once. Point ``pretrained`` at a trained checkpoint
    (e.g. ``runs/demo/runs/umg-seed0/final`` from ``make demo``).
    """

    name = "umgclip"

    def __init__(
        self,
        model: str = "umg-lite",
        pretrained: str | None = None,
        device: str = "cpu",
        vocabulary: list[str] | None = None,
        prompt: str = "a photo of a {}.",
        topk: int = 5,
        bf16: bool = True,
        text_batch: int = 256,
        text_cache: str | None = "auto",
    ) -> None:
        from umgclip.model.registry import create_model, is_model_dir

        self.model = create_model(model, pretrained=pretrained, device=device).eval()
        self.pre = self.model.preprocess_cfg
        self.device, self.prompt, self.topk, self.bf16 = device, prompt, topk, bf16
        self.text_batch = text_batch
        self.vocabulary = list(vocabulary or [])
        self._vocab_emb: torch.Tensor | None = None
        self.text_cache = text_cache
        # A saved model folder is a checkpoint; a bare registry name is not.
        self.trained = pretrained is not None or is_model_dir(model)
        if not self.trained:
            log.warning(
                "umgclip backend %r has no trained checkpoint (`pretrained`): its tags are near "
                "chance and its scores will not be used to filter",
                model,
            )
        self.name = f"umgclip:{pretrained or model}"

    def _ctx(self) -> contextlib.AbstractContextManager:
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(torch.device(self.device).type, dtype=torch.bfloat16)

    def prepare(self, images: list[Image.Image]) -> tuple[torch.Tensor, list[tuple[float, float]]]:
        """(B,3,S,S) model input and each image's (sx, sy): ``model_px = original_px * s``."""
        size = self.pre.size
        xs, scales = [], []
        for im in images:
            w, h = im.size
            nw, nh = max(1, round(w * size / max(w, h))), max(1, round(h * size / max(w, h)))
            t = TF.pil_to_tensor(im.convert("RGB"))
            t = TF.resize(t, [nh, nw], interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
            t = TF.to_dtype(t, torch.float32, scale=True)
            t = TF.pad(t, [0, 0, size - nw, size - nh], fill=[f / 255 for f in self.pre.fill])
            xs.append(TF.normalize(t, list(self.pre.mean), list(self.pre.std)))
            scales.append((nw / w, nh / h))
        return torch.stack(xs).to(self.device), scales

    @torch.no_grad()
    def encode_images(self, images: list[Image.Image]) -> torch.Tensor:
        x, _ = self.prepare(images)
        with self._ctx():
            return self.model.encode_image(x).float().cpu()

    @torch.no_grad()
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        out = []
        for i in range(0, len(texts), self.text_batch):
            tok = self.model.tokenizer(texts[i : i + self.text_batch]).to(self.device)
            with self._ctx():
                out.append(self.model.encode_text(tok).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, self.model.embed_dim)

    @torch.no_grad()
    def encode_regions(
        self, images: list[Image.Image], boxes: list[np.ndarray]
    ) -> list[torch.Tensor]:
        """One (K,D) tensor per image; boxes in original pixels (already valid and clipped)."""
        x, scales = self.prepare(images)
        tb = [
            torch.as_tensor(
                np.asarray(b, np.float32).reshape(-1, 4) * np.array([sx, sy, sx, sy], np.float32)
            ).to(self.device)
            for b, (sx, sy) in zip(boxes, scales)
        ]
        with self._ctx():
            out = self.model.encode_boxes(x, tb)
        return [o.float().cpu() for o in out]

    def _vocab(self) -> torch.Tensor:
        if not self.vocabulary:
            raise ValueError("umgclip tagging needs a vocabulary")
        if self._vocab_emb is None:
            texts = [self.prompt.format(v) for v in self.vocabulary]
            key = cache_key(module_fingerprint(self.model), texts, bf16=self.bf16, kind="umgclip")
            self._vocab_emb = cached_text_embeddings(self.encode_texts, texts, key, self.text_cache)
        return self._vocab_emb

    def _tags(self, emb: torch.Tensor) -> list[list[Tag]]:
        if len(emb) == 0:
            return []
        sims = emb @ self._vocab().T
        top = sims.topk(min(self.topk, sims.shape[1]), dim=1)
        return [
            [Tag(self.vocabulary[i], float(s)) for s, i in zip(vs.tolist(), ix.tolist())]
            for vs, ix in zip(top.values, top.indices)
        ]

    def tag(self, images: list[Image.Image]) -> list[list[Tag]]:
        return self._tags(self.encode_images(images)) if images else []

    def label_regions(
        self, images: list[Image.Image], boxes: list[np.ndarray]
    ) -> list[list[list[Tag]]]:
        if not images:
            return []
        return [self._tags(e) for e in self.encode_regions(images, boxes)]

    def image_text(self, images: list[Image.Image], texts: list[list[str]]) -> list[np.ndarray]:
        if not images:
            return []
        emb = self.encode_images(images)
        flat = [t for ts in texts for t in ts]
        temb = self.encode_texts(flat) if flat else None
        out, i = [], 0
        for b, ts in enumerate(texts):
            out.append((temb[i : i + len(ts)] @ emb[b]).numpy() if ts else np.zeros(0, np.float32))
            i += len(ts)
        return out

    def region_text(
        self, images: list[Image.Image], boxes: list[np.ndarray], texts: list[list[str]]
    ) -> list[np.ndarray]:
        if not images:
            return []
        regs = self.encode_regions(images, boxes)
        return [
            (r * self.encode_texts(t)).sum(-1).numpy() if t else np.zeros(0, np.float32)
            for r, t in zip(regs, texts)
        ]
