"""The umgclip sample schema (DESIGN section 3): one image plus its multi-granularity labels.

A sample is stored as JSON next to its image in a webdataset shard (``KEY.jpg`` + ``KEY.json``,
optionally ``KEY.panoptic.png``). Boxes are ``[x0, y0, x1, y1]`` in pixels of the original image;
masks are COCO RLE dicts (``{"size": [h, w], "counts": str}``) as pycocotools writes them.

The round trip ``Sample.from_dict(s.to_dict()) == s`` is exact: every field is a plain JSON type.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

SCHEMA_VERSION = 1

RegionKind = Literal["thing", "stuff"]
REGION_KINDS: tuple[str, ...] = ("thing", "stuff")

#: ``caption_sources`` values. ``composed`` marks captions built from tags by a template, never
#: to be mistaken for a captioner's output.
CAPTION_SOURCES: tuple[str, ...] = ("human", "input", "model", "composed")


class SchemaError(ValueError):
    """A sample or region does not satisfy the schema."""


@dataclass
class Region:
    """One region of an image: a box, its labels and optionally its mask."""

    box: list[float]
    tags: list[str] = field(default_factory=list)
    caption: str | None = None
    mask: dict[str, Any] | None = None
    score: float | None = None
    source: str = "unknown"
    kind: str = "thing"
    category_id: int | None = None
    iscrowd: bool = False

    def __post_init__(self) -> None:
        # Boxes are always floats so the JSON round trip is exact whatever the caller passed.
        if isinstance(self.box, (list, tuple)):
            self.box = [float(v) if isinstance(v, (int, float)) else v for v in self.box]

    def validate(self, width: int | None = None, height: int | None = None) -> None:
        """Raise :class:`SchemaError` unless the region is well formed.

        A box must have four finite coordinates with ``x1 > x0`` and ``y1 > y0``; when the image
        size is given it must overlap the image. Masks must be RLE dicts of the image's size.
        """
        if len(self.box) != 4:
            raise SchemaError(f"region box needs 4 numbers (xyxy), got {self.box!r}")
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in self.box):
            raise SchemaError(f"region box has a non-finite coordinate: {self.box!r}")
        x0, y0, x1, y1 = self.box
        if not (x1 > x0 and y1 > y0):
            raise SchemaError(f"region box has zero or negative area (xyxy expected): {self.box!r}")
        if width is not None and height is not None:
            if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
                raise SchemaError(
                    f"region box {self.box!r} lies wholly outside the {width}x{height} image"
                )
        if self.kind not in REGION_KINDS:
            raise SchemaError(f"region kind must be one of {REGION_KINDS}, got {self.kind!r}")
        if not isinstance(self.tags, list) or not all(isinstance(t, str) for t in self.tags):
            raise SchemaError(f"region tags must be a list of strings, got {self.tags!r}")
        if self.caption is not None and not isinstance(self.caption, str):
            raise SchemaError(f"region caption must be a string or null, got {self.caption!r}")
        if self.mask is not None:
            if (
                not isinstance(self.mask, dict)
                or "size" not in self.mask
                or "counts" not in self.mask
            ):
                raise SchemaError("region mask must be a COCO RLE dict with 'size' and 'counts'")
            if (
                width is not None
                and height is not None
                and list(self.mask["size"]) != [height, width]
            ):
                raise SchemaError(
                    f"region mask size {self.mask['size']} differs from the image's [{height}, {width}]"
                )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Region:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise SchemaError(f"unknown region fields {sorted(unknown)}")
        if "box" not in d:
            raise SchemaError("a region needs a 'box'")
        return cls(**d)


@dataclass
class Sample:
    """One image with captions, image tags, regions and optional panoptic segments.

    ``panoptic`` (when the image has a panoptic PNG, stored as ``KEY.panoptic.png``) holds
    ``{"segments": [{"id", "category_id", "category", "isthing", "area"}]}``; the PNG encodes
    segment ids as ``R + 256*G + 256**2*B`` (COCO panoptic convention).
    """

    key: str
    width: int
    height: int
    captions: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    regions: list[Region] = field(default_factory=list)
    source: dict[str, Any] = field(default_factory=dict)
    caption_sources: list[str] = field(default_factory=list)
    panoptic: dict[str, Any] | None = None
    split: str | None = None
    schema_version: int = SCHEMA_VERSION

    def validate(self) -> None:
        """Raise :class:`SchemaError` unless the sample and all its regions are well formed."""
        if not self.key or "." in self.key or "/" in self.key:
            raise SchemaError(f"sample key must be non-empty without '.' or '/': {self.key!r}")
        if not (isinstance(self.width, int) and isinstance(self.height, int)):
            raise SchemaError("width and height must be integers")
        if self.width <= 0 or self.height <= 0:
            raise SchemaError(f"image size must be positive, got {self.width}x{self.height}")
        if not all(isinstance(c, str) for c in self.captions):
            raise SchemaError("captions must be strings")
        if self.caption_sources and len(self.caption_sources) != len(self.captions):
            raise SchemaError("caption_sources must be empty or as long as captions")
        for s in self.caption_sources:
            if s not in CAPTION_SOURCES:
                raise SchemaError(f"caption source must be one of {CAPTION_SOURCES}, got {s!r}")
        if self.schema_version > SCHEMA_VERSION:
            raise SchemaError(
                f"sample schema version {self.schema_version} is newer than this umgclip "
                f"understands ({SCHEMA_VERSION}); upgrade umgclip"
            )
        for r in self.regions:
            r.validate(self.width, self.height)

    def caption_source(self, i: int) -> str:
        """Where caption ``i`` came from (``input`` when not recorded)."""
        return self.caption_sources[i] if self.caption_sources else "input"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["regions"] = [r.to_dict() for r in self.regions]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Sample:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise SchemaError(f"unknown sample fields {sorted(unknown)}")
        for req in ("key", "width", "height"):
            if req not in d:
                raise SchemaError(f"a sample needs {req!r}")
        regions = [Region.from_dict(r) for r in d.get("regions", [])]
        return cls(**{**d, "regions": regions})

    @classmethod
    def from_json(cls, text: str | bytes) -> Sample:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise SchemaError(f"sample JSON does not parse: {e}") from e
        if not isinstance(d, dict):
            raise SchemaError("sample JSON must be an object")
        return cls.from_dict(d)
