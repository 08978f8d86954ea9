"""Semantic-segmentation decoder: an FPN over the tower's multi-scale maps plus a fused head."""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import FeaturePyramidNetwork


def fpn_features(fpn: FeaturePyramidNetwork, feats: list[torch.Tensor]) -> list[torch.Tensor]:
    """Run torchvision's FPN on a list of maps (strides ascending), return them as a list."""
    out = fpn(OrderedDict((str(i), f) for i, f in enumerate(feats)))
    return list(out.values())


class SemanticDecoder(nn.Module):
    """FPN (torchvision) -> every level upsampled to the finest and summed -> 3x3 -> classifier.

    ``forward(feats)`` takes ``image_tower.forward_multiscale(x)`` (strides ascending) and returns
    class logits ``(B, num_classes, h, w)`` at the finest feature stride; callers upsample.
    """

    def __init__(self, in_channels: list[int], num_classes: int, dim: int = 128):
        super().__init__()
        self.fpn = FeaturePyramidNetwork(list(in_channels), dim)
        self.fuse = nn.Sequential(
            nn.Conv2d(dim, dim, 3, padding=1, bias=False),
            nn.GroupNorm(8 if dim % 8 == 0 else 1, dim),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Conv2d(dim, num_classes, 1)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        levels = fpn_features(self.fpn, feats)
        size = levels[0].shape[-2:]
        fused = levels[0]
        for lvl in levels[1:]:
            fused = fused + F.interpolate(lvl, size=size, mode="bilinear", align_corners=False)
        return self.classifier(self.fuse(fused))


def semantic_loss(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int = 255
) -> torch.Tensor:
    """Pixel cross-entropy with the logits upsampled to the label map's size."""
    logits = F.interpolate(
        logits.float(), size=target.shape[-2:], mode="bilinear", align_corners=False
    )
    return F.cross_entropy(logits, target.long(), ignore_index=ignore_index)
