"""Open-vocabulary mask classification (FC-CLIP): mask-pool the frozen backbone's dense features,
score them against class-name text embeddings, and combine with the decoder's in-vocabulary
probabilities by a geometric ensemble."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mask_pool(dense: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
    """Average ``dense`` (B,D,h,w) under soft masks (B,Q,H,W logits) -> L2-normalised (B,Q,D).

    Masks are resized to the feature grid and used as sigmoid weights (FC-CLIP pools with the
    soft mask so that small masks still reach at least their overlapping cells).
    """
    w = F.interpolate(
        mask_logits.float(), size=dense.shape[-2:], mode="bilinear", align_corners=False
    )
    w = w.sigmoid()
    pooled = torch.einsum("bqhw,bdhw->bqd", w, dense.float()) / (w.sum((-1, -2))[..., None] + 1e-6)
    return F.normalize(pooled, dim=-1)


def out_vocab_probs(
    pooled: torch.Tensor, class_emb: torch.Tensor, logit_scale: float
) -> torch.Tensor:
    """Softmax over classes of scaled cosine similarities: (B,Q,D) x (K,D) -> (B,Q,K)."""
    return (logit_scale * pooled @ F.normalize(class_emb.float(), dim=-1).T).softmax(-1)


def geometric_ensemble(
    p_in: torch.Tensor,
    p_out: torch.Tensor,
    seen: torch.Tensor,
    alpha: float = 0.4,
    beta: float = 0.8,
) -> torch.Tensor:
    """FC-CLIP's ensemble. ``p_in`` (...,K+1) in-vocabulary probabilities ("no object" last),
    ``p_out`` (...,K) out-of-vocabulary probabilities, ``seen`` (K,) bool.

    Per class ``p = p_in^(1-a) * p_out^a`` with ``a = alpha`` for seen and ``beta`` for unseen
    classes; the K products are renormalised, scaled by ``1 - p_void`` and ``p_void`` (from the
    in-vocabulary head) is appended, so the result is a distribution over K+1.
    """
    if p_in.shape[-1] != p_out.shape[-1] + 1:
        raise ValueError(
            f"p_in has {p_in.shape[-1]} classes, expected p_out's {p_out.shape[-1]} + 1"
        )
    void = p_in[..., -1:]
    a = torch.where(seen.to(p_out.device), alpha, beta).to(p_out.dtype)
    # FC-CLIP renormalises the in-vocabulary class probabilities after dropping "no object"
    # only implicitly (through the final renormalisation below); we follow it exactly.
    log_p = (1 - a) * p_in[..., :-1].clamp_min(1e-12).log() + a * p_out.clamp_min(1e-12).log()
    return torch.cat([log_p.softmax(-1) * (1 - void), void], dim=-1)
