"""Mask-classification decoder for panoptic segmentation (a small Mask2Former-style head).

Learned queries cross-attend (``torch.nn.TransformerDecoder``) to the coarsest FPN levels; each
query gives a class distribution over ``K`` classes + "no object" and a mask (dot product of a
mask embedding with per-pixel features at the finest level). Classes are scored against the text
embeddings of their names (FC-CLIP's in-vocabulary classifier), so the head is not tied to a fixed
label set and unseen class names can be scored at inference.

Simplifications against Mask2Former (CPU budget): no masked attention, no deep supervision,
losses on full low-resolution masks instead of sampled points.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import FeaturePyramidNetwork

from umgclip.model.decoders.matcher import hungarian_match, match_cost
from umgclip.model.decoders.semantic import fpn_features


def sine_position_encoding(h: int, w: int, dim: int, device: torch.device) -> torch.Tensor:
    """DETR's 2-D sine encoding, (h*w, dim). torchvision has no public version of it."""
    npf = dim // 2
    y = torch.arange(h, device=device, dtype=torch.float32)[:, None].expand(h, w) / max(h, 1)
    x = torch.arange(w, device=device, dtype=torch.float32)[None, :].expand(h, w) / max(w, 1)
    t = 10000 ** (2 * (torch.arange(npf, device=device) // 2) / npf)
    px, py = (x[..., None] * 2 * math.pi) / t, (y[..., None] * 2 * math.pi) / t
    px = torch.stack((px[..., 0::2].sin(), px[..., 1::2].cos()), dim=-1).flatten(2)
    py = torch.stack((py[..., 0::2].sin(), py[..., 1::2].cos()), dim=-1).flatten(2)
    return torch.cat((py, px), dim=-1).reshape(h * w, -1)


class PanopticDecoder(nn.Module):
    """``forward(feats, class_emb)`` -> ``{"pred_logits": (B,Q,K+1), "pred_masks": (B,Q,h,w),
    "query_emb": (B,Q,D)}`` with ``class_emb`` (K,D) L2-normalised text embeddings."""

    def __init__(
        self,
        in_channels: list[int],
        embed_dim: int,
        dim: int = 128,
        num_queries: int = 50,
        layers: int = 3,
        heads: int = 4,
        memory_levels: int = 2,
    ):
        super().__init__()
        # GroupNorm in the pixel decoder (as Mask2Former's): backbone features reach std ~8, and
        # without it the initial mask logits had std ~8, so sigmoids saturated at 0, the dice
        # gradient vanished and every mask collapsed to empty (the PQ 0.0 of issue #7).
        self.fpn = FeaturePyramidNetwork(
            list(in_channels), dim, norm_layer=partial(nn.GroupNorm, min(32, dim // 4))
        )
        self.mask_features = nn.Conv2d(dim, dim, 1)
        self.memory_levels = max(1, min(memory_levels, len(in_channels)))
        self.level_embed = nn.Parameter(torch.zeros(self.memory_levels, dim))
        self.query_feat = nn.Embedding(num_queries, dim)
        self.query_pos = nn.Embedding(num_queries, dim)
        layer = nn.TransformerDecoderLayer(
            dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True
        )
        self.transformer = nn.TransformerDecoder(layer, layers, norm=nn.LayerNorm(dim))
        self.class_proj = nn.Linear(dim, embed_dim)
        self.void_embed = nn.Parameter(torch.randn(embed_dim) / math.sqrt(embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.mask_embed = nn.Sequential(
            nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, dim), nn.ReLU(inplace=True),
            nn.Linear(dim, dim),
        )  # fmt: skip
        self.num_queries = num_queries

    def forward(
        self, feats: list[torch.Tensor], class_emb: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        levels = fpn_features(self.fpn, feats)
        b = levels[0].shape[0]
        mem = []
        for i, lvl in enumerate(levels[-self.memory_levels :]):
            h, w = lvl.shape[-2:]
            pos = sine_position_encoding(h, w, lvl.shape[1], lvl.device).to(lvl.dtype)
            mem.append(lvl.flatten(2).transpose(1, 2) + pos + self.level_embed[i])
        memory = torch.cat(mem, dim=1)
        tgt = self.query_feat.weight[None].expand(b, -1, -1) + self.query_pos.weight[None]
        q = self.transformer(tgt, memory)
        emb = F.normalize(self.class_proj(q), dim=-1)
        classes = torch.cat(
            [
                F.normalize(class_emb.to(emb.dtype), dim=-1),
                F.normalize(self.void_embed, dim=0)[None].to(emb.dtype),
            ]
        )
        logits = self.logit_scale.exp().clamp(max=100) * emb @ classes.T
        masks = torch.einsum("bqc,bchw->bqhw", self.mask_embed(q), self.mask_features(levels[0]))
        return {"pred_logits": logits, "pred_masks": masks, "query_emb": q}


@dataclass
class PanopticTarget:
    """One image's ground truth: ``labels`` (T,) class indices, ``masks`` (T,H,W) bool."""

    labels: torch.Tensor
    masks: torch.Tensor


def dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    p = logits.sigmoid().flatten(1)
    t = target.flatten(1)
    return (1 - (2 * (p * t).sum(-1) + 1) / (p.sum(-1) + t.sum(-1) + 1)).sum()


def panoptic_loss(
    out: dict[str, torch.Tensor],
    targets: list[PanopticTarget],
    w_class: float = 2.0,
    w_mask: float = 5.0,
    w_dice: float = 5.0,
    no_object: float = 0.1,
) -> dict[str, torch.Tensor]:
    """Hungarian-matched classification + mask BCE + dice losses (Mask2Former's set criterion).

    Target masks are resized (nearest) to the predicted mask resolution; mask losses are
    averaged over the number of matched segments in the batch.
    """
    logits = out["pred_logits"].float()
    masks = out["pred_masks"].float()
    b, q, k1 = logits.shape
    h, w = masks.shape[-2:]
    tgt_classes = torch.full((b, q), k1 - 1, dtype=torch.long, device=logits.device)
    src_m, tgt_m = [], []
    for i, t in enumerate(targets):
        if t.labels.numel() == 0:
            continue
        tm = F.interpolate(t.masks[None].float(), size=(h, w), mode="nearest")[0]
        with torch.no_grad():
            cost = match_cost(
                logits[i].softmax(-1), masks[i], t.labels, tm, w_class, w_mask, w_dice
            )
        pi, ti = hungarian_match(cost)
        tgt_classes[i, pi] = t.labels[ti].to(logits.device)
        src_m.append(masks[i, pi])
        tgt_m.append(tm[ti])
    weight = torch.ones(k1, device=logits.device)
    weight[-1] = no_object
    loss_ce = F.cross_entropy(logits.transpose(1, 2), tgt_classes, weight=weight)
    if src_m:
        sm, tm = torch.cat(src_m), torch.cat(tgt_m)
        n = max(sm.shape[0], 1)
        loss_mask = (
            F.binary_cross_entropy_with_logits(sm.flatten(1), tm.flatten(1), reduction="none")
            .mean(1)
            .sum()
            / n
        )
        loss_dice = dice_loss(sm, tm) / n
    else:
        loss_mask = loss_dice = masks.sum() * 0.0
    loss = w_class * loss_ce + w_mask * loss_mask + w_dice * loss_dice
    return {
        "loss": loss,
        "ce": loss_ce.detach(),
        "mask": loss_mask.detach(),
        "dice": loss_dice.detach(),
    }


@dataclass
class PanopticResult:
    """``segmentation`` (H,W) int64 segment ids (0 = void); ``segments`` dicts with ``id``,
    ``category`` (class index), ``isthing``, ``score``, ``area``."""

    segmentation: torch.Tensor
    segments: list[dict]


@torch.no_grad()
def panoptic_inference(
    class_prob: torch.Tensor,
    mask_logits: torch.Tensor,
    is_thing: torch.Tensor,
    object_threshold: float = 0.5,
    overlap_threshold: float = 0.8,
) -> PanopticResult:
    """Mask2Former's panoptic merge for one image.

    ``class_prob`` (Q, K+1) probabilities with "no object" last; ``mask_logits`` (Q,H,W) at the
    output size; ``is_thing`` (K,) bool. Queries whose best class is "no object" or scores below
    ``object_threshold`` are dropped; each pixel goes to the query maximising score * mask prob;
    a segment keeping less than ``overlap_threshold`` of its own mask is dropped; all segments of
    one stuff class are merged into one.
    """
    scores, labels = class_prob.float().max(-1)
    k = class_prob.shape[-1] - 1
    keep = (labels != k) & (scores > object_threshold)
    scores, labels = scores[keep], labels[keep]
    probs = mask_logits[keep].float().sigmoid()
    h, w = mask_logits.shape[-2:]
    seg = torch.zeros((h, w), dtype=torch.long, device=mask_logits.device)
    segments: list[dict] = []
    if probs.shape[0] == 0:
        return PanopticResult(seg, segments)
    owner = (scores[:, None, None] * probs).argmax(0)
    stuff_ids: dict[int, int] = {}
    for j in range(probs.shape[0]):
        cls = int(labels[j])
        thing = bool(is_thing[cls])
        region = (owner == j) & (probs[j] >= 0.5)
        original = int((probs[j] >= 0.5).sum())
        area = int(region.sum())
        if original == 0 or area == 0 or area / original < overlap_threshold:
            continue
        if not thing and cls in stuff_ids:
            sid = stuff_ids[cls]
            seg[region] = sid
            next(s for s in segments if s["id"] == sid)["area"] += area
            continue
        sid = len(segments) + 1
        seg[region] = sid
        if not thing:
            stuff_ids[cls] = sid
        segments.append(
            {"id": sid, "category": cls, "isthing": thing, "score": float(scores[j]), "area": area}
        )
    return PanopticResult(seg, segments)
