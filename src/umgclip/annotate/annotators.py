"""Annotator interfaces: one job each, batched (a list of images in, a list of results out).

Every backend implements one or more of these small ABCs; the pipeline only talks to the
interfaces, so a YAML config can swap OWLv2 for the classical proposer (or the EfficientNet
tagger for the umgclip one) without code changes. Boxes are always ``xyxy`` float pixels of
the ORIGINAL image: backends undo their own resizing and padding before returning.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass, field

import numpy as np
from PIL import Image


@dataclass
class Tag:
    """A label with the backend's confidence (a probability or a similarity)."""

    name: str
    score: float


@dataclass
class Detections:
    """Boxes found in one image: ``boxes`` (K,4) xyxy original pixels, ``scores`` (K,),
    ``labels`` K strings (empty when the detector is class-agnostic)."""

    boxes: np.ndarray
    scores: np.ndarray
    labels: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)
        self.scores = np.asarray(self.scores, dtype=np.float32).reshape(-1)
        if len(self.scores) != len(self.boxes):
            raise ValueError(f"{len(self.boxes)} boxes but {len(self.scores)} scores")
        if not self.labels:
            self.labels = [""] * len(self.boxes)
        if len(self.labels) != len(self.boxes):
            raise ValueError(f"{len(self.boxes)} boxes but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.boxes)

    def select(self, keep: np.ndarray | list[int]) -> Detections:
        """The detections at indices ``keep`` (in that order)."""
        idx = np.asarray(keep, dtype=np.int64).reshape(-1)
        return Detections(self.boxes[idx], self.scores[idx], [self.labels[i] for i in idx])


class Annotator:
    """Base of every annotator: a name recorded as the ``source`` of what it produces."""

    #: Written into ``Region.source`` / ``Sample.source["annotators"]``.
    name: str = "annotator"


class ImageTagger(Annotator):
    @abstractmethod
    def tag(self, images: list[Image.Image]) -> list[list[Tag]]:
        """Tags for each image, best first."""


class ImageCaptioner(Annotator):
    @abstractmethod
    def caption(self, images: list[Image.Image]) -> list[list[str]]:
        """Captions for each image (one or more)."""


class RegionDetector(Annotator):
    #: True when ``detect`` uses ``vocabulary`` (open-vocabulary detectors).
    open_vocabulary: bool = False

    @abstractmethod
    def detect(
        self, images: list[Image.Image], vocabulary: list[str] | None = None
    ) -> list[Detections]:
        """Boxes (+ scores, labels) per image, in original pixel coordinates."""


class MaskGenerator(Annotator):
    @abstractmethod
    def masks(self, images: list[Image.Image], boxes: list[np.ndarray]) -> list[np.ndarray]:
        """One boolean mask (H, W) of the original image per box: returns (K, H, W) per image."""


class RegionCaptioner(Annotator):
    @abstractmethod
    def caption_regions(
        self, images: list[Image.Image], boxes: list[np.ndarray]
    ) -> list[list[str]]:
        """One caption per box per image."""


class RegionLabeller(Annotator):
    """Names what is inside given boxes (closed or open vocabulary)."""

    @abstractmethod
    def label_regions(
        self, images: list[Image.Image], boxes: list[np.ndarray]
    ) -> list[list[list[Tag]]]:
        """For each image, for each box, its tags best first."""


class Scorer(Annotator):
    """Image-text and region-text agreement (a CLIP-style cosine similarity).

    ``trained`` is False for a model whose image/text projections were never trained: the
    pipeline then records its scores but filters nothing on them (a threshold on chance-level
    similarities would drop arbitrary labels).
    """

    trained: bool = True

    @abstractmethod
    def image_text(self, images: list[Image.Image], texts: list[list[str]]) -> list[np.ndarray]:
        """For each image, the similarity of each of its texts."""

    @abstractmethod
    def region_text(
        self, images: list[Image.Image], boxes: list[np.ndarray], texts: list[list[str]]
    ) -> list[np.ndarray]:
        """For each image, the similarity of box ``k`` with text ``k`` (one text per box)."""
