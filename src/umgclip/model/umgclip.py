"""The UMG-CLIP model: one image tower, one text tower, a shared embedding space.

Images, regions (boxes or masks) and texts all land in the same ``embed_dim`` space: regions are
pooled from the image tower's dense map *before* its head and then pass through the same head
as the whole image (DESIGN 1.2), so a region keeps the context of the full image (C18).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from umgclip.config import PreprocessConfig
from umgclip.model.model_config import ModelConfig
from umgclip.model.regions import mask_pool, mask_weights, roi_pool, validate_boxes
from umgclip.model.towers.base import ImageTower, TextTower


def _normalize(x: torch.Tensor, normalize: bool, dim: int = -1) -> torch.Tensor:
    return F.normalize(x, dim=dim) if normalize else x


class UMGCLIP(nn.Module):
    """A multi-granularity CLIP model (see docs/architecture.md for the contract)."""

    def __init__(
        self, cfg: ModelConfig, image_tower: ImageTower, text_tower: TextTower, tokenizer: Any
    ) -> None:
        super().__init__()
        # C08: a tokenizer whose context length differs from the text tower's is rejected here,
        # not as a shape error inside the forward.
        if tokenizer.context_length != text_tower.context_length:
            raise ValueError(
                f"tokenizer context_length {tokenizer.context_length} does not match the text "
                f"tower's {text_tower.context_length}"
            )
        if cfg.tokenizer.context_length != text_tower.context_length:
            raise ValueError(
                f"config tokenizer.context_length {cfg.tokenizer.context_length} does not match "
                f"the text tower's {text_tower.context_length}"
            )
        self.cfg = cfg
        self.image_tower = image_tower
        self.text_tower = text_tower
        self.tokenizer = tokenizer
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.init_logit_scale)))
        self._cluster_override: bool | None = None
        self._sync_clustering()

    # ------------------------------------------------------------------ properties / modes
    @property
    def preprocess_cfg(self) -> PreprocessConfig:
        return self.cfg.preprocess

    @property
    def embed_dim(self) -> int:
        return self.cfg.embed_dim

    @property
    def context_length(self) -> int:
        return self.text_tower.context_length

    def logit_scale_value(self) -> torch.Tensor:
        """``exp(logit_scale)`` clamped at ``max_logit_scale`` (100), computed in fp32 (C12)."""
        return self.logit_scale.float().exp().clamp(max=self.cfg.max_logit_scale)

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        """Clamp the parameter itself to ``[0, log(max)]`` (call after an optimiser step)."""
        self.logit_scale.clamp_(0.0, math.log(self.cfg.max_logit_scale))

    def set_token_clustering(self, enabled: bool | None) -> None:
        """Force token clustering on/off in both train and eval mode; ``None`` restores the
        config's defaults (``clustering.train`` / ``clustering.eval``). No-op for CNN towers."""
        self._cluster_override = enabled
        self._sync_clustering()

    @property
    def supports_token_clustering(self) -> bool:
        return hasattr(self.image_tower, "cluster_enabled")

    def _sync_clustering(self) -> None:
        if not self.supports_token_clustering:
            return
        c = self.cfg.clustering
        default = c.train if self.training else c.eval
        on = default if self._cluster_override is None else self._cluster_override
        self.image_tower.cluster_enabled = bool(on)

    def train(self, mode: bool = True) -> UMGCLIP:
        super().train(mode)
        if hasattr(self, "cfg"):
            self._sync_clustering()
        return self

    # ------------------------------------------------------------------ encoders
    def encode_image(self, x: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """``(B,3,H,W)`` normalised images -> ``(B,D)``."""
        pooled = self.image_tower.forward_pooled(x)
        return _normalize(self.image_tower.head(pooled), normalize)

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """``(N, context_length)`` token ids from ``model.tokenizer`` -> ``(N,D)``."""
        if not isinstance(tokens, torch.Tensor) or tokens.ndim != 2:
            raise ValueError("tokens must be a (N, context_length) LongTensor from model.tokenizer")
        if tokens.dtype not in (torch.long, torch.int):
            raise TypeError(f"tokens must be integer ids, got dtype {tokens.dtype}")
        if tokens.shape[1] != self.context_length:
            raise ValueError(
                f"tokens have length {tokens.shape[1]}, the model's context length is "
                f"{self.context_length}: use model.tokenizer"
            )
        return _normalize(self.text_tower(tokens.long()), normalize)

    def encode_dense(self, x: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """``(B,3,H,W)`` -> ``(B,D,h,w)`` per-cell embeddings (stride ``image_tower.stride``)."""
        _, dense = self.image_tower.forward_features(x)
        out = self.image_tower.head(dense.permute(0, 2, 3, 1))
        return _normalize(out, normalize).permute(0, 3, 1, 2)

    def _check_batch(self, x: torch.Tensor, items: list, what: str) -> None:
        if not isinstance(items, (list, tuple)):
            raise TypeError(f"{what} must be a list with one tensor per image")
        if len(items) != x.shape[0]:
            raise ValueError(f"{len(items)} {what} lists for a batch of {x.shape[0]} images")

    def _regions_from_dense(
        self,
        dense: torch.Tensor,
        image_size: tuple[int, int],
        boxes: list[torch.Tensor],
        on_invalid: str,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        clean = [
            validate_boxes(b, image_size, on_invalid=on_invalid, image_index=i)
            for i, b in enumerate(boxes)
        ]
        ic = self.cfg.image
        pooled = roi_pool(
            dense, [c.boxes for c in clean], image_size, ic.roi_output_size, ic.roi_sampling_ratio
        )
        return self.image_tower.head(pooled), [c.valid for c in clean]

    def encode_boxes(
        self,
        x: torch.Tensor,
        boxes: list[torch.Tensor],
        normalize: bool = True,
        on_invalid: str = "raise",
        return_valid: bool = False,
    ) -> list[torch.Tensor] | tuple[list[torch.Tensor], list[torch.Tensor]]:
        """One ``(K_i,D)`` tensor per image for its ``(K_i,4)`` xyxy boxes in input pixels.

        Boxes are validated first (rule in :mod:`umgclip.model.regions`): partly-outside boxes
        are clipped; invalid ones raise, or with ``on_invalid="drop"`` are dropped, and then
        ``return_valid=True`` also returns the per-image boolean masks of kept input rows.
        """
        self._check_batch(x, boxes, "boxes")
        _, dense = self.image_tower.forward_features(x)
        emb, valid = self._regions_from_dense(dense, tuple(x.shape[-2:]), boxes, on_invalid)
        out = list(_normalize(emb, normalize).split([int(v.sum()) for v in valid]))
        return (out, valid) if return_valid else out

    def encode_masks(
        self,
        x: torch.Tensor,
        masks: list[torch.Tensor],
        normalize: bool = True,
        on_invalid: str = "raise",
        return_valid: bool = False,
    ) -> list[torch.Tensor] | tuple[list[torch.Tensor], list[torch.Tensor]]:
        """One ``(K_i,D)`` tensor per image for its ``(K_i,H,W)`` masks (any H,W; resized to the
        dense map by area, so each cell weighs by the fraction the mask covers). An empty mask
        raises, or is dropped under ``on_invalid="drop"`` (see ``return_valid``)."""
        self._check_batch(x, masks, "masks")
        _, dense = self.image_tower.forward_features(x)
        outs, valids = [], []
        for i, m in enumerate(masks):
            cm = mask_weights(torch.as_tensor(m), tuple(dense.shape[-2:]), on_invalid, i)
            pooled = mask_pool(dense[i], cm.weights.to(dense.device))
            outs.append(_normalize(self.image_tower.head(pooled), normalize))
            valids.append(cm.valid)
        return (outs, valids) if return_valid else outs

    def forward_train(
        self,
        images: torch.Tensor,
        boxes: list[torch.Tensor] | None = None,
        on_invalid: str = "drop",
    ) -> dict[str, torch.Tensor]:
        """One image-tower pass for the training losses.

        Returns normalised ``image`` ``(B,D)``; with boxes also ``regions`` ``(sumK,D)`` (valid
        boxes only), ``region_image`` ``(sumK,)`` (the image of each region) and
        ``region_valid`` ``(sum K_input,)`` bool (which input boxes the rows are: index the region
        texts with it), plus ``regions_dropped`` (a 0-d count). Invalid boxes are dropped by
        default so one bad box never kills a long run.
        """
        pooled, dense = self.image_tower.forward_features(images)
        out = {"image": F.normalize(self.image_tower.head(pooled), dim=-1)}
        if boxes is not None:
            self._check_batch(images, boxes, "boxes")
            emb, valid = self._regions_from_dense(
                dense, tuple(images.shape[-2:]), boxes, on_invalid
            )
            counts = torch.tensor([int(v.sum()) for v in valid], device=images.device)
            out["regions"] = F.normalize(emb, dim=-1)
            out["region_image"] = torch.repeat_interleave(
                torch.arange(len(valid), device=images.device), counts
            )
            flat = torch.cat(valid) if valid else torch.zeros(0, dtype=torch.bool)
            out["region_valid"] = flat.to(images.device)
            out["regions_dropped"] = (~flat).sum()
        return out

    def forward(
        self, images: torch.Tensor | None = None, tokens: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """open_clip-style forward: normalised ``image`` / ``text`` features + ``logit_scale``."""
        out: dict[str, torch.Tensor] = {"logit_scale": self.logit_scale_value()}
        if images is not None:
            out["image"] = self.encode_image(images)
        if tokens is not None:
            out["text"] = self.encode_text(tokens)
        return out

    # ------------------------------------------------------------------ io
    def save_pretrained(self, out_dir: str | Path) -> Path:
        """Write ``model.safetensors`` + ``config.json`` (+ tokenizer / text arch files)."""
        from umgclip.model.io import save_pretrained

        return save_pretrained(self, out_dir)
