"""The two tower interfaces every backbone implements.

An image tower maps images to *pre-projection* features: one pooled vector per image and a
dense map, both in the same channel space, and owns the ``head`` (final norm + projection) that
takes either into the shared embedding space. Sharing the head is what puts images and regions
in one space (DESIGN 1.2): a region is RoIAlign / mask pooling on the dense map followed by the
same head. A text tower maps token ids to embeddings of the shared size.
"""

from __future__ import annotations

import torch
from torch import nn


class ImageTower(nn.Module):
    """Base class: subclasses implement ``forward_features``, ``head`` and ``forward_multiscale``."""

    #: Nominal stride of the dense map (input pixels per map cell).
    stride: int = 16
    #: Channels of the pre-projection features.
    width: int = 0

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B,3,H,W)`` -> pooled ``(B,C)`` and dense ``(B,C,h,w)``, both before the head."""
        raise NotImplementedError

    def forward_pooled(self, x: torch.Tensor) -> torch.Tensor:
        """Only the pooled ``(B,C)`` pre-head feature (towers may skip dense-map work)."""
        return self.forward_features(x)[0]

    def head(self, feats: torch.Tensor) -> torch.Tensor:
        """Final norm + projection on channel-last features ``(...,C)`` -> ``(...,D)``."""
        raise NotImplementedError

    def forward_multiscale(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Pre-projection feature maps ``(B,C_i,h_i,w_i)``, strides ascending (for decoders)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_pooled(x))

    def _check_input(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != 3:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"images must be a (B,3,H,W) tensor, got {shape}")
        if not x.is_floating_point():
            raise TypeError(f"images must be a normalised float tensor, got dtype {x.dtype}")
        # A bf16 copy of the model (the fast inference path) gets fp32 inputs from preprocess;
        # under autocast the weights stay fp32 and autocast handles the cast itself.
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.param_dtype)
        return x

    @property
    def param_dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype


class TextTower(nn.Module):
    """Base class: ``forward(ids (N,L) long) -> (N,D)``; ``context_length`` is the L it expects."""

    context_length: int = 0

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class ProjectionHead(nn.Module):
    """LayerNorm + bias-free linear projection, applied channel-last."""

    def __init__(self, width: int, embed_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, embed_dim, bias=False)
        nn.init.normal_(self.proj.weight, std=width**-0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(x))
