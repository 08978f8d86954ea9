"""Annotation pipeline config (YAML via :func:`umgclip.config.load_config`).

Each annotator slot names a backend from :mod:`umgclip.annotate.backends` (``none`` disables
the slot); every filter threshold lives in :class:`FilterConfig` so nothing is hard-coded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class AnnotatorSpec:
    """One annotator slot.

    ``backend``: ``none``, ``classical``, ``imagenet``, ``umgclip``, ``owlv2``, ``sam``,
    ``blip``, ``clip`` (which slots a backend can fill: see ``backends.SLOTS``).
    ``model``: a local folder or Hugging Face id (HF backends), a registry name (umgclip).
    ``options``: backend-specific keyword arguments (documented on each backend class).
    """

    backend: str = "none"
    model: str | None = None
    pretrained: str | None = None
    device: str = "cpu"
    batch_size: int = 8
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class FilterConfig:
    """Quality filter thresholds (``null`` disables a rule). Areas are fractions of the image."""

    min_caption_score: float | None = None
    min_region_tag_score: float | None = None
    min_box_score: float | None = 0.0
    min_area_frac: float | None = 0.005
    max_area_frac: float | None = 0.95
    min_side: float | None = 8.0
    max_aspect: float | None = 8.0
    nms_iou: float | None = 0.7
    min_mask_area_frac: float | None = 0.001
    min_mask_fill: float | None = 0.15
    max_regions: int | None = 20


@dataclass
class RayConfig:
    """``--executor ray``: a local Ray instance unless ``address`` is given."""

    address: str | None = None
    num_cpus: int | None = 2
    concurrency: int = 1
    #: Per-slot actor pool size overrides, e.g. ``{detector: 2}``.
    slot_concurrency: dict[str, int] = field(default_factory=dict)
    #: CPUs each stage actor reserves; ``null``: the cluster's CPUs shared evenly by all
    #: actors, so every pool can start (one whole CPU per actor would leave later stages
    #: waiting for resources on a small machine).
    actor_cpus: float | None = None


@dataclass
class AnnotateConfig:
    tagger: AnnotatorSpec = field(default_factory=AnnotatorSpec)
    captioner: AnnotatorSpec = field(default_factory=AnnotatorSpec)
    detector: AnnotatorSpec = field(default_factory=AnnotatorSpec)
    region_labeller: AnnotatorSpec = field(default_factory=AnnotatorSpec)
    masker: AnnotatorSpec = field(default_factory=AnnotatorSpec)
    region_captioner: AnnotatorSpec = field(default_factory=AnnotatorSpec)
    scorer: AnnotatorSpec = field(default_factory=AnnotatorSpec)
    #: ``default`` (shipped COCO + ImageNet names) or a path to a text file, one name a line.
    vocabulary: str = "default"
    #: Image tags kept per image (best first) and their minimum score.
    max_image_tags: int = 10
    min_tag_score: float = 0.0
    #: Tags kept per region.
    region_topk: int = 1
    #: Compose a caption from tags when an image has none (marked ``composed``).
    compose_captions: bool = True
    keep_input_regions: bool = True
    filters: FilterConfig = field(default_factory=FilterConfig)
    #: Images per output shard; also the unit of resumption (manifest entry).
    shard_size: int = 64
    batch_size: int = 8
    #: Read only this split of imported shards (``train``/``val``) when the input has an index.
    split: str | None = None
    limit: int | None = None
    ray: RayConfig = field(default_factory=RayConfig)
