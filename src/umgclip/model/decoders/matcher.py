"""Hungarian matching of predicted masks to ground-truth segments (Mask2Former costs)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment


def pairwise_bce(pred_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean sigmoid BCE between every prediction (Q,P) and every target (T,P) -> (Q,T).

    Written as two matmuls (the Mask2Former trick) instead of Q*T separate BCE calls.
    """
    p = pred_logits.float()
    pos = F.binary_cross_entropy_with_logits(p, torch.ones_like(p), reduction="none")
    neg = F.binary_cross_entropy_with_logits(p, torch.zeros_like(p), reduction="none")
    t = target.float()
    return (pos @ t.T + neg @ (1 - t).T) / p.shape[1]


def pairwise_dice(pred_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - Dice between every sigmoid prediction (Q,P) and every target (T,P) -> (Q,T)."""
    p = pred_logits.float().sigmoid()
    t = target.float()
    num = 2 * p @ t.T
    den = p.sum(-1)[:, None] + t.sum(-1)[None, :]
    return 1 - (num + 1) / (den + 1)


def match_cost(
    class_prob: torch.Tensor,
    mask_logits: torch.Tensor,
    tgt_labels: torch.Tensor,
    tgt_masks: torch.Tensor,
    w_class: float = 2.0,
    w_mask: float = 5.0,
    w_dice: float = 5.0,
) -> torch.Tensor:
    """The (Q,T) matching cost: -w_class*p(label) + w_mask*BCE + w_dice*(1-Dice).

    ``class_prob`` (Q, K+1) softmax probabilities; masks (Q,h,w) logits and (T,h,w) {0,1}.
    """
    cost_class = -class_prob[:, tgt_labels]
    q, t = mask_logits.flatten(1), tgt_masks.flatten(1)
    return w_class * cost_class + w_mask * pairwise_bce(q, t) + w_dice * pairwise_dice(q, t)


@torch.no_grad()
def hungarian_match(cost: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimum-cost one-to-one assignment (scipy). Returns (pred_idx, tgt_idx), sorted by pred."""
    if cost.numel() == 0:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty
    if not torch.isfinite(cost).all():
        raise ValueError("hungarian_match: the cost matrix has NaN or infinite entries")
    rows, cols = linear_sum_assignment(cost.detach().cpu().numpy())
    return torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)
