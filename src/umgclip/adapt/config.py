"""Configs of ``umgclip adapt`` (loaded with :func:`umgclip.config.load_config`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class AdapterConfig:
    """Convpass bypasses (ViT) or per-stage convolutional bypasses (CNN towers)."""

    hidden: int = 8
    scale: float = 0.1
    # CNN towers only: leave the first N stages without a bypass. Backpropagating through the
    # high-resolution early stages dominates a CPU step; 0 = a bypass on every stage.
    cnn_skip_stages: int = 0


@dataclass
class DecoderConfig:
    """Task decoder over ``image_tower.forward_multiscale`` features."""

    dim: int = 128
    num_queries: int = 50
    layers: int = 3
    heads: int = 4
    memory_levels: int = 2  # coarsest FPN levels the panoptic queries cross-attend to


@dataclass
class LossConfig:
    """Mask-classification loss weights (Mask2Former defaults) and the matcher's costs."""

    ce: float = 2.0
    mask: float = 5.0
    dice: float = 5.0
    no_object: float = 0.1


@dataclass
class InferenceConfig:
    """Panoptic inference (Mask2Former) and the open-vocabulary ensemble (FC-CLIP)."""

    object_threshold: float = 0.5
    overlap_threshold: float = 0.8
    open_vocab: bool = True
    alpha_seen: float = 0.4
    beta_unseen: float = 0.8


@dataclass
class AdaptDataConfig:
    """Images with panoptic labels. ``source``: an imported shard folder or a COCO-layout root
    (empty: the shipped coco_mg). ``holdout_classes``: class names never shown in training."""

    source: str = ""
    size: int = 320
    val_every_n: int = 5  # coco-root source: image_id % val_every_n == 0 -> val
    max_train: int = 0  # 0 = all
    max_val: int = 0
    holdout_classes: list[str] = field(default_factory=list)
    prompt: str = "a photo of a {}."


@dataclass
class AdaptTrainConfig:
    steps: int = 300
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup: int = 20
    precision: Literal["bf16", "fp32"] = "bf16"
    seed: int = 0
    log_every: int = 10
    device: str = "cpu"
    threads: int = 0  # 0 = torch default


@dataclass
class AdaptConfig:
    """One adaptation run: backbone (checkpoint folder or registry name) + task + data + train."""

    backbone: str = "runs/demo/runs/umg-seed0/final"  # `make demo` writes it
    task: Literal["semseg", "panoptic"] = "semseg"
    out_dir: str = "runs/adapt"
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    data: AdaptDataConfig = field(default_factory=AdaptDataConfig)
    train: AdaptTrainConfig = field(default_factory=AdaptTrainConfig)
