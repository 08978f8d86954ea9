"""UMG-CLIP pre-training losses: image-text (ITC), region-text (RTC), image-tag and region-tag.

All four are computed on the GLOBAL batch: embeddings are all-gathered across processes with
gradients and every rank evaluates the same full loss, so a distributed run computes exactly the
single-process loss on the concatenated batch (C14) and, after DDP's gradient averaging, the same
gradients (each rank's share of the gathered gradient is summed over ranks in backward, which DDP's
mean then cancels).

Identical strings are positives of each other (C11): a caption that appears twice, "person" on
many regions. Targets are the row-normalised equality matrix of the strings, so a batch with no
duplicates reduces to the usual one-hot InfoNCE.

Terms that cannot be computed on this global batch (fewer than two items for a contrastive term,
no tags for a tag term) are skipped explicitly with a warning and left out of the returned dict
(C10); they never turn into a silent zero. Logits are computed in fp32 with the scale clamped at
``max_logit_scale`` (C12), so bf16 autocast cannot overflow them.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)

TERMS: tuple[str, ...] = ("itc", "rtc", "image_tag", "region_tag")


@dataclass
class LossConfig:
    """Weights and variants of the pre-training losses (DESIGN 1.2).

    ``tag_loss``: ``softmax`` (each image/region against the batch's tag vocabulary, cross-entropy
    with multi-positive targets) or ``sigmoid`` (SigLIP-style independent binary terms with a fixed
    ``sigmoid_bias``, summed over the vocabulary and averaged over rows). A weight of 0 disables a
    term (the trainer then does not even compute its inputs: the CLIP baseline is ``rtc: 0,
    image_tag: 0, region_tag: 0``).
    """

    itc: float = 1.0
    rtc: float = 1.0
    image_tag: float = 0.5
    region_tag: float = 0.5
    tag_loss: str = "softmax"
    sigmoid_bias: float = -5.0
    tag_prompt: str = "a photo of a {}."
    max_logit_scale: float = 100.0
    gather: bool = True

    def __post_init__(self) -> None:
        if self.tag_loss not in ("softmax", "sigmoid"):
            raise ValueError(f"loss.tag_loss must be 'softmax' or 'sigmoid', got {self.tag_loss!r}")
        for name in TERMS:
            w = getattr(self, name)
            if not math.isfinite(w) or w < 0:
                raise ValueError(f"loss.{name} weight must be finite and >= 0, got {w}")

    def weight(self, term: str) -> float:
        return float(getattr(self, term))

    def enabled(self, term: str) -> bool:
        return self.weight(term) > 0


@dataclass
class LossTargets:
    """The strings behind the embeddings of one (local) batch, in the embeddings' row order.

    ``captions[i]`` is the text of ``out["text"][i]`` paired with ``out["image"][i]``;
    ``region_texts[r]`` pairs with ``out["regions"][r]`` / ``out["region_text"][r]``;
    ``tags[i]`` are image ``i``'s tags, ``region_tags[r]`` region ``r``'s;
    ``tag_vocab[v]`` is the tag whose prompt was encoded into ``out["tag_text"][v]``.
    """

    captions: list[str] = field(default_factory=list)
    region_texts: list[str] = field(default_factory=list)
    tags: list[list[str]] = field(default_factory=list)
    region_tags: list[list[str]] = field(default_factory=list)
    tag_vocab: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- distributed gather


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherVar(torch.autograd.Function):
    """All-gather rows of different counts per rank, with gradients.

    Hand-written because ``torch.distributed.nn.functional.all_gather`` needs equal shapes on every
    rank (region and tag counts differ) and its backward uses reduce_scatter, which gloo (our CPU
    backend) does not implement. Backward: every rank holds the gradient of the same global loss
    w.r.t. the gathered tensor; all-reduce (sum) it and keep this rank's rows.
    """

    @staticmethod
    def forward(ctx, x: Tensor, counts: list[int]) -> Tensor:  # type: ignore[override]
        rank, world = _world()
        ctx.counts, ctx.rank = counts, rank
        m = max(counts)
        padded = x.new_zeros((m, *x.shape[1:]))
        padded[: x.shape[0]] = x
        bufs = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(bufs, padded.contiguous())
        return torch.cat([b[:n] for b, n in zip(bufs, counts)], 0)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        start = sum(ctx.counts[: ctx.rank])
        return grad[start : start + ctx.counts[ctx.rank]], None


def gather_rows(x: Tensor) -> Tensor:
    """Concatenate ``x`` (N_rank, ...) over all ranks in rank order, keeping gradients."""
    _, world = _world()
    if world == 1:
        return x
    n = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)
    ns = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(ns, n)
    return _GatherVar.apply(x, [int(v.item()) for v in ns])


def gather_objects(items: list) -> list:
    """Concatenate a picklable list over all ranks in rank order (strings, tag lists)."""
    _, world = _world()
    if world == 1:
        return list(items)
    out: list[list] = [None] * world  # type: ignore[list-item]
    dist.all_gather_object(out, list(items))
    return [v for part in out for v in part]


# ------------------------------------------------------------------------------- loss functions


def equality_targets(row_keys: list, col_keys: list) -> Tensor:
    """Row-normalised equality matrix: ``T[i, j] = [row_i == col_j] / #{j: row_i == col_j}``.

    Rows without any equal column are all zero (the caller must exclude them).
    """
    index: dict = {}
    for k in (*row_keys, *col_keys):
        index.setdefault(k, len(index))
    r = torch.tensor([index[k] for k in row_keys], dtype=torch.long)
    c = torch.tensor([index[k] for k in col_keys], dtype=torch.long)
    eq = (r[:, None] == c[None, :]).float()
    return eq / eq.sum(1, keepdim=True).clamp_min(1.0)


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean over rows of ``-sum_j T_ij log softmax(logits)_ij`` (targets rows sum to 1)."""
    return -(targets * F.log_softmax(logits, dim=-1)).sum(-1).mean()


def contrastive_loss(a: Tensor, b: Tensor, keys: list, scale: Tensor) -> Tensor:
    """Symmetric InfoNCE between paired rows of ``a`` and ``b`` with multi-positive targets.

    ``keys[i]`` identifies pair ``i``'s text; rows with equal keys are positives of each other
    in both directions (C11). ``a``/``b`` are L2-normalised (N, D).
    """
    logits = scale * a.float() @ b.float().t()
    t = equality_targets(keys, keys).to(logits.device)
    # The equality matrix is symmetric, so its row-normalisation serves both directions.
    return 0.5 * (soft_cross_entropy(logits, t) + soft_cross_entropy(logits.t(), t))


def multilabel_loss(
    emb: Tensor,
    labels: list[list[str]],
    vocab: list[str],
    vocab_emb: Tensor,
    scale: Tensor,
    kind: str = "softmax",
    bias: float = -5.0,
) -> Tensor | None:
    """Each row of ``emb`` against the tag vocabulary; ``labels[i]`` are row ``i``'s tags.

    Rows without a tag in ``vocab`` carry no supervision and are excluded (an unlabelled image is
    not evidence that every tag is absent). Returns None when no row has a tag.
    ``softmax``: cross-entropy against the multi-hot row normalised to sum 1.
    ``sigmoid``: binary cross-entropy on ``scale * cos + bias`` summed over the vocabulary and
    averaged over rows (SigLIP's normalisation).
    """
    pos = {t: j for j, t in enumerate(vocab)}
    multi_hot = torch.zeros(len(labels), len(vocab))
    for i, tags in enumerate(labels):
        for t in tags:
            if t in pos:
                multi_hot[i, pos[t]] = 1.0
    keep = multi_hot.sum(1) > 0
    if not bool(keep.any()):
        return None
    keep_idx = keep.nonzero().squeeze(1).to(emb.device)
    multi_hot = multi_hot[keep].to(emb.device)
    logits = scale * emb.float().index_select(0, keep_idx) @ vocab_emb.float().t()
    if kind == "sigmoid":
        return F.binary_cross_entropy_with_logits(logits + bias, multi_hot, reduction="sum") / len(
            multi_hot
        )
    return soft_cross_entropy(logits, multi_hot / multi_hot.sum(1, keepdim=True))


def _dedupe(vocab: list[str], emb: Tensor) -> tuple[list[str], Tensor]:
    """Keep the first occurrence of each tag (ranks encode overlapping local vocabularies)."""
    first: dict[str, int] = {}
    for j, t in enumerate(vocab):
        first.setdefault(t, j)
    idx = torch.tensor(list(first.values()), dtype=torch.long, device=emb.device)
    return list(first), emb.index_select(0, idx)


class UMGLoss(nn.Module):
    """The weighted sum of the four UMG-CLIP losses on the global batch.

    ``out`` holds L2-normalised embeddings: ``image`` (B, D), ``text`` (B, D) for ITC;
    ``regions`` / ``region_text`` (R, D) for RTC; ``tag_text`` (V, D) for the tag terms; and
    ``logit_scale`` (the temperature's exp, a scalar tensor; clamped again here). Keys a disabled
    term does not need may be absent. Returns ``loss`` plus each computed term (unweighted).
    Under ``torch.distributed`` every rank must call it (collectives inside), as DDP requires.
    """

    def __init__(self, cfg: LossConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg or LossConfig()
        self.last_skipped: dict[str, str] = {}

    def _gather(self, x: Tensor) -> Tensor:
        return gather_rows(x) if self.cfg.gather else x

    def _gather_obj(self, items: list) -> list:
        return gather_objects(items) if self.cfg.gather else list(items)

    def _skip(self, term: str, why: str) -> None:
        self.last_skipped[term] = why
        log.warning("loss term %s skipped for this step: %s", term, why)

    def forward(self, out: dict[str, Tensor], targets: LossTargets) -> dict[str, Tensor]:
        cfg = self.cfg
        self.last_skipped = {}
        with torch.autocast(device_type=out["image"].device.type, enabled=False):
            scale = out["logit_scale"].float().clamp(max=cfg.max_logit_scale)
            terms: dict[str, Tensor] = {}

            if cfg.enabled("itc"):
                img, txt = self._gather(out["image"]), self._gather(out["text"])
                caps = self._gather_obj(targets.captions)
                if img.shape[0] < 2:
                    self._skip("itc", f"global batch of {img.shape[0]} image(s) has no negatives")
                else:
                    terms["itc"] = contrastive_loss(img, txt, caps, scale)

            need_regions = cfg.enabled("rtc") or cfg.enabled("region_tag")
            regions = self._gather(out["regions"]) if need_regions else None

            if cfg.enabled("rtc"):
                rtxt = self._gather(out["region_text"])
                rkeys = self._gather_obj(targets.region_texts)
                if regions.shape[0] < 2:
                    self._skip("rtc", f"global batch of {regions.shape[0]} region(s)")
                else:
                    terms["rtc"] = contrastive_loss(regions, rtxt, rkeys, scale)

            if cfg.enabled("image_tag") or cfg.enabled("region_tag"):
                vocab, vemb = _dedupe(
                    self._gather_obj(targets.tag_vocab), self._gather(out["tag_text"])
                )
                for term, emb, labels in (
                    ("image_tag", "image", "tags"),
                    ("region_tag", "regions", "region_tags"),
                ):
                    if not cfg.enabled(term):
                        continue
                    rows = regions if term == "region_tag" else self._gather(out[emb])
                    lab = self._gather_obj(getattr(targets, labels))
                    value = (
                        multilabel_loss(
                            rows, lab, vocab, vemb, scale, cfg.tag_loss, cfg.sigmoid_bias
                        )
                        if vocab
                        else None
                    )
                    if value is None:
                        self._skip(term, "no row of the global batch has a tag")
                    else:
                        terms[term] = value

            if terms:
                total = sum(cfg.weight(k) * v for k, v in terms.items())
            else:
                # Nothing computable: a zero that still reaches every input, so backward (and
                # DDP's gradient hooks) run the same way on every rank.
                total = sum(v.float().sum() * 0.0 for v in out.values() if v.requires_grad)
                total = total if isinstance(total, Tensor) else scale * 0.0
        return {"loss": total, **terms}
