"""``PretrainConfig``: everything ``umgclip train CONFIG.yaml`` reads (one dataclass tree).

Loaded with :func:`umgclip.config.load_config`, so unknown keys fail at start-up and any field can
be overridden with ``--set section.key=value``. The README's ``train`` section is the reference.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from umgclip.data.loader import DataConfig
from umgclip.losses import LossConfig
from umgclip.train.schedule import ScheduleConfig


@dataclass
class ModelSection:
    """Which model to train and which of its parameters move.

    ``frozen``: parameter-name prefixes to freeze (``image_tower.``, ``text_tower.encoder.layer.0``);
    ``unfrozen``: prefixes that stay trainable even under a frozen prefix (e.g. the towers'
    projections). ``clustering``/``clustering_keep``: token clustering during training (ViT
    towers; None keeps the model config's choice). ``overrides``: other model-config fields as
    ``key=value`` strings (``clustering.cluster_after=3``).
    ``factory``: ``"package.module:function"`` returning ``(model, preprocess_cfg)`` for a model
    not in the registry (called with ``(name, pretrained, device)``).
    """

    name: str = "umg-lite"
    pretrained: str | None = None
    clustering: bool | None = None
    clustering_keep: float | None = None
    frozen: list[str] = field(default_factory=list)
    unfrozen: list[str] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)
    factory: str = ""


@dataclass
class OptimConfig:
    """AdamW. ``lr`` is the base LR; ``image_lr``/``text_lr``/``head_lr`` override it per tower
    (``image_tower.*``, ``text_tower.*``, everything else: projections, logit_scale, heads).
    No weight decay on biases, norms, embeddings and ``logit_scale`` (nor any 0/1-d tensor)."""

    lr: float = 5e-4
    image_lr: float | None = None
    text_lr: float | None = None
    head_lr: float | None = None
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    weight_decay: float = 0.2
    fused: bool = True
    grad_clip: float = 1.0
    accum_steps: int = 1


@dataclass
class PretrainConfig:
    """The whole pre-training run. ``output_dir``: the run folder (created; ``--resume`` reads its
    latest checkpoint). ``device``: ``cpu``, ``cuda`` or ``auto``. ``bf16``: autocast (weights and
    optimizer stay fp32). ``data_factory``: optional ``"module:function"`` replacing
    :func:`umgclip.data.loader.build_loader` (called like it, plus ``epoch=``)."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    bf16: bool = True
    device: str = "cpu"
    seed: int = 0
    output_dir: str = "runs/train"
    log_every: int = 10
    checkpoint_every: int = 0
    keep_last: int = 2
    find_unused_parameters: bool = True
    data_factory: str = ""
    progress: bool = True
