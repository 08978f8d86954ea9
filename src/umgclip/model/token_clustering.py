"""Cluster-based token reduction for ViT towers (DESIGN 1.3).

After block ``cluster_after`` the patch tokens are grouped by DPC-kNN (density-peak clustering
with k nearest neighbours, as in TCFormer / AiluRus) inside local windows so every cluster is
spatially contiguous; ``keep`` of the tokens become cluster centres, every other token joins its
nearest centre, and the merged token is the mean of its members. The remaining blocks run on the
short sequence with *proportional attention*: ``log(cluster size)`` is added to the attention
logits of each key, so a cluster of n tokens weighs as much as its n members would. The class
token is never merged. Afterwards the clusters are unfolded (each patch takes its cluster's
token) so dense features and RoIAlign see the full patch grid.

The selection (distances, density, centres, assignment) is discrete and runs without autograd
in fp32; the merge (a scatter-mean) is differentiable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class Clusters:
    """Result of clustering a ``(B, N, C)`` patch sequence into ``M`` clusters per image."""

    #: ``(B, N)`` cluster index of every patch, in ``[0, M)``.
    assign: torch.Tensor
    #: ``(B, M)`` number of patches in each cluster (float, >= 1).
    sizes: torch.Tensor

    @property
    def num_clusters(self) -> int:
        return int(self.sizes.shape[1])


def _windows(grid: tuple[int, int], window: int) -> tuple[int, int]:
    gh, gw = grid
    wh = gh if window <= 0 else window
    ww = gw if window <= 0 else window
    if gh % wh or gw % ww:
        raise ValueError(
            f"token clustering window {window} does not divide the patch grid {gh}x{gw}; "
            "pick a divisor (or 0 for the whole grid)"
        )
    return wh, ww


def centres_per_window(n: int, keep: float) -> int:
    """How many centres a window of ``n`` tokens keeps (at least one, at most ``n``)."""
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"token clustering keep must be in (0, 1], got {keep}")
    return min(n, max(1, round(keep * n)))


@torch.no_grad()
def dpc_knn_assign(x: torch.Tensor, num_centres: int, k: int = 5) -> torch.Tensor:
    """DPC-kNN on ``(G, n, C)`` groups: the index of each token's cluster in ``[0, num_centres)``.

    density_i = exp(-mean of squared distances to its k nearest neighbours); delta_i = distance
    to the nearest denser token (the densest token gets the largest distance); the
    ``num_centres`` tokens with the highest density * delta are centres; every token joins its
    nearest centre and each centre its own cluster.
    """
    g, n, c = x.shape
    xf = x.float()
    dist = torch.cdist(xf, xf) / math.sqrt(c)
    kk = min(k, n)
    knn = dist.topk(kk, dim=-1, largest=False).values
    density = (-(knn**2).mean(-1)).exp()
    # Deterministic tie-break (TCFormer adds random noise): earlier tokens are marginally denser.
    density = density + torch.linspace(1e-6, 0.0, n, device=x.device)
    higher = density[:, None, :] > density[:, :, None]
    dmax = dist.flatten(1).max(-1).values[:, None, None]
    delta = torch.where(higher, dist, dmax).min(-1).values
    score = delta * density
    centres = score.topk(num_centres, dim=-1).indices  # (g, m)
    to_centres = dist.gather(2, centres[:, None, :].expand(g, n, num_centres))
    assign = to_centres.argmin(-1)
    # A centre always belongs to its own cluster (duplicate tokens could otherwise empty one).
    assign.scatter_(1, centres, torch.arange(num_centres, device=x.device).expand(g, -1))
    return assign


def cluster_tokens(
    x: torch.Tensor, grid: tuple[int, int], keep: float = 0.25, k: int = 5, window: int = 7
) -> tuple[torch.Tensor, Clusters]:
    """Merge ``(B, N, C)`` patch tokens on a ``grid`` into ``(B, M, C)`` cluster tokens."""
    b, n, c = x.shape
    gh, gw = grid
    if gh * gw != n:
        raise ValueError(f"{n} patch tokens do not fill a {gh}x{gw} grid")
    wh, ww = _windows(grid, window)
    nh, nw = gh // wh, gw // ww
    per = wh * ww
    m = centres_per_window(per, keep)
    # (B, gh, gw, C) -> (B, nh, nw, wh*ww, C): one group per local window.
    xw = x.reshape(b, nh, wh, nw, ww, c).permute(0, 1, 3, 2, 4, 5).reshape(b * nh * nw, per, c)
    local = dpc_knn_assign(xw, m, k)  # (B*nW, per)
    offset = torch.arange(nh * nw, device=x.device).repeat(b)[:, None] * m
    glob = (local + offset).reshape(b, nh, nw, wh, ww).permute(0, 1, 3, 2, 4).reshape(b, n)
    total = nh * nw * m
    sizes = torch.zeros(b, total, device=x.device, dtype=torch.float32)
    sizes.scatter_add_(1, glob, torch.ones(b, n, device=x.device, dtype=torch.float32))
    summed = torch.zeros(b, total, c, device=x.device, dtype=x.dtype)
    summed = summed.scatter_add(1, glob[..., None].expand(b, n, c), x)
    merged = summed / sizes[..., None].to(x.dtype)
    return merged, Clusters(assign=glob, sizes=sizes)


def unfold_tokens(tokens: torch.Tensor, clusters: Clusters) -> torch.Tensor:
    """``(B, M, C)`` cluster tokens -> ``(B, N, C)``: every patch takes its cluster's token."""
    b, _, c = tokens.shape
    idx = clusters.assign[..., None].expand(b, clusters.assign.shape[1], c)
    return tokens.gather(1, idx)


def proportional_attention_mask(
    sizes: torch.Tensor, num_heads: int, num_prefix: int = 1
) -> torch.Tensor:
    """Additive ``(B*heads, L, L)`` float mask adding ``log(size)`` of each key to the logits.

    Prefix tokens (the class token) count as size 1. The shape is what
    ``nn.MultiheadAttention`` takes for a per-sample mask, so open_clip's own blocks run it
    through ``F.scaled_dot_product_attention`` (the fused path) unchanged.
    """
    b, m = sizes.shape
    prefix = torch.zeros(b, num_prefix, device=sizes.device, dtype=sizes.dtype)
    bias = torch.cat([prefix, sizes.log()], dim=1)  # (B, L)
    length = m + num_prefix
    return (
        bias[:, None, None, :]
        .expand(b, num_heads, length, length)
        .reshape(b * num_heads, length, length)
    )
