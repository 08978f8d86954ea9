"""Import COCO (captions + instances + panoptic) into umgclip webdataset shards.

Output folder: ``train-000000.tar ...``, ``val-000000.tar ...`` (each member group
``KEY.jpg`` + ``KEY.json`` [+ ``KEY.panoptic.png``]) and ``index.json`` (counts, categories,
split membership, schema version). The train/val split is a hash of the image id, so it is the
same on every machine and does not move when images are added or removed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from umgclip.data.images import ImageDecodeError, read_image_size
from umgclip.data.masks import MaskError, encode_mask, rle_area, rle_box_xyxy, to_rle
from umgclip.data.schema import SCHEMA_VERSION, Region, Sample
from umgclip.data.shards import ShardWriter, SkipCounter, decode_panoptic

log = logging.getLogger(__name__)

INDEX_FORMAT = "umgclip-shards"


def split_of(image_id: int | str, val_fraction: float) -> str:
    """``"val"`` or ``"train"`` from a hash of the image id (deterministic, order-free)."""
    h = int(hashlib.sha1(str(image_id).encode()).hexdigest()[:8], 16) / 2**32
    return "val" if h < val_fraction else "train"


def tag_name(name: str) -> str:
    """COCO category name -> natural-language tag ("wall-other-merged" -> "wall")."""
    for suffix in ("-merged", "-other", "-stuff"):
        name = name.replace(suffix, "")
    return name.replace("-", " ").strip()


def _load(path: Path | None, what: str) -> dict[str, Any] | None:
    if path is None:
        return None
    if not path.is_file():
        raise FileNotFoundError(f"COCO {what} file not found: {path}")
    with open(path) as f:
        return json.load(f)


def _clip_box(bbox: list[float], w: int, h: int) -> list[float] | None:
    """COCO xywh -> xyxy clipped to the image; None if non-finite or empty after clipping."""
    if len(bbox) != 4 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in bbox):
        return None
    x, y, bw, bh = bbox
    x0, y0 = max(0.0, float(x)), max(0.0, float(y))
    x1, y1 = min(float(w), float(x + bw)), min(float(h), float(y + bh))
    if x1 <= x0 or y1 <= y0:
        return None
    return [x0, y0, x1, y1]


def import_coco(
    root: str | Path,
    out: str | Path,
    captions: str | Path | None = None,
    instances: str | Path | None = None,
    panoptic: str | Path | None = None,
    panoptic_dir: str | Path | None = None,
    images: str | Path | None = None,
    val_fraction: float = 0.2,
    shard_size: int = 1000,
) -> dict[str, Any]:
    """Convert a COCO-layout folder into shards + ``index.json``; returns the index.

    Defaults follow the coco_mg layout: ``ROOT/annotations/{captions,instances,panoptic}.json``,
    ``ROOT/images/``, ``ROOT/panoptic/``. A missing instances or panoptic file is allowed (the
    samples then have no regions / no stuff); captions are required.
    """
    root = Path(root)
    out = Path(out)
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    ann = root / "annotations"
    cap_path = Path(captions) if captions else ann / "captions.json"
    inst_path = Path(instances) if instances else ann / "instances.json"
    pan_path = Path(panoptic) if panoptic else ann / "panoptic.json"
    img_dir = Path(images) if images else root / "images"
    pan_dir = Path(panoptic_dir) if panoptic_dir else root / "panoptic"

    cap = _load(cap_path, "captions")
    assert cap is not None
    inst = _load(inst_path, "instances") if (instances or inst_path.is_file()) else None
    pan = _load(pan_path, "panoptic") if (panoptic or pan_path.is_file()) else None
    # Allowed (a captions-only import is valid), but never silent: it changes everything
    # downstream (no regions, no region losses, no segmentation metrics).
    if inst is None:
        log.warning("no instances file at %s: importing without boxes or instance masks", inst_path)
    if pan is None:
        log.warning(
            "no panoptic file at %s: importing without stuff regions or panoptic maps", pan_path
        )
    if not img_dir.is_dir():
        raise FileNotFoundError(f"COCO image folder not found: {img_dir}")

    # Categories: the 133 panoptic (things + stuff) and the 80 instance classes share ids.
    cats: dict[int, dict[str, Any]] = {}
    for c in (pan or {}).get("categories", []):
        cats[c["id"]] = {
            "id": c["id"],
            "name": c["name"],
            "tag": tag_name(c["name"]),
            "isthing": bool(c["isthing"]),
            "supercategory": c.get("supercategory", ""),
        }
    for c in (inst or {}).get("categories", []):
        cats.setdefault(
            c["id"],
            {
                "id": c["id"],
                "name": c["name"],
                "tag": tag_name(c["name"]),
                "isthing": True,
                "supercategory": c.get("supercategory", ""),
            },
        )

    images_by_id: dict[int, dict[str, Any]] = {im["id"]: im for im in cap["images"]}
    caps_by_image: dict[int, list[str]] = defaultdict(list)
    for a in sorted(cap["annotations"], key=lambda a: a["id"]):
        caps_by_image[a["image_id"]].append(str(a["caption"]).strip())
    anns_by_image: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for a in sorted((inst or {}).get("annotations", []), key=lambda a: a["id"]):
        anns_by_image[a["image_id"]].append(a)
    pan_by_image = {a["image_id"]: a for a in (pan or {}).get("annotations", [])}

    skips = SkipCounter()
    counts: Counter = Counter()
    split_keys: dict[str, list[str]] = {"train": [], "val": []}
    writers = {s: ShardWriter(out, prefix=s, max_samples=shard_size) for s in ("train", "val")}
    try:
        for image_id in sorted(images_by_id):
            im = images_by_id[image_id]
            key = f"{image_id:012d}"
            try:
                data = (img_dir / im["file_name"]).read_bytes()
                size = read_image_size(data, key)
            except (OSError, ImageDecodeError) as e:
                skips.add("bad_image", key, str(e))
                continue
            w, h = int(im["width"]), int(im["height"])
            if size != (w, h):
                skips.add("size_mismatch", key, f"JSON {w}x{h}, file {size[0]}x{size[1]}")
                continue
            regions, tags = _thing_regions(anns_by_image[image_id], cats, w, h, counts)
            pan_png = None
            pan_info = None
            if image_id in pan_by_image:
                pa = pan_by_image[image_id]
                png_path = pan_dir / pa["file_name"]
                if png_path.is_file():
                    pan_png = png_path.read_bytes()
                    stuff, pan_info = _panoptic_regions(pa, pan_png, cats, w, h, key, counts)
                    regions += stuff
                    for r in stuff:
                        tags.extend(t for t in r.tags if t not in tags)
                else:
                    counts["panoptic_png_missing"] += 1
            split = split_of(image_id, val_fraction)
            sample = Sample(
                key=key,
                width=w,
                height=h,
                captions=caps_by_image.get(image_id, []),
                caption_sources=["human"] * len(caps_by_image.get(image_id, [])),
                tags=tags,
                regions=regions,
                source={
                    "dataset": "coco",
                    "image_id": image_id,
                    "file_name": im["file_name"],
                    "coco_split": im.get("coco_split"),
                    "license": im.get("license"),
                },
                panoptic=pan_info,
                split=split,
            )
            sample.validate()
            writers[split].write(sample, data, image_ext="jpg", panoptic_png=pan_png)
            split_keys[split].append(key)
            counts["images"] += 1
            counts["captions"] += len(sample.captions)
            counts["empty_captions"] += sum(1 for c in sample.captions if not c)
            counts["images_with_panoptic"] += pan_png is not None
            counts[f"images_{split}"] += 1
        shards = {s: [p.name for p in w_.close()] for s, w_ in writers.items()}
    except BaseException:
        for w_ in writers.values():
            w_.abort()
        raise

    index = {
        "format": INDEX_FORMAT,
        "schema_version": SCHEMA_VERSION,
        "source": {
            "root": str(root),
            "captions": str(cap_path),
            "instances": str(inst_path) if inst else None,
            "panoptic": str(pan_path) if pan else None,
        },
        "split_rule": {"method": "sha1(image_id) < val_fraction", "val_fraction": val_fraction},
        "counts": dict(sorted(counts.items()))
        | {
            "thing_categories": sum(
                1 for c in cats.values() if c["isthing"] and c["id"] in _thing_ids(inst)
            ),
            "categories": len(cats),
        },
        "categories": [cats[i] for i in sorted(cats)],
        "splits": {
            s: {"images": len(k), "keys": k, "shards": shards[s]} for s, k in split_keys.items()
        },
        "skipped": skips.to_dict(),
    }
    tmp = out / "index.json.tmp"
    tmp.write_text(json.dumps(index, indent=1))
    tmp.replace(out / "index.json")
    log.info(
        "imported %d images (%s) into %s; %s",
        counts["images"],
        {s: len(k) for s, k in split_keys.items()},
        out,
        skips.summary(),
    )
    return index


def _thing_ids(inst: dict[str, Any] | None) -> set[int]:
    return {c["id"] for c in (inst or {}).get("categories", [])}


def _thing_regions(
    anns: list[dict[str, Any]], cats: dict[int, dict[str, Any]], w: int, h: int, counts: Counter
) -> tuple[list[Region], list[str]]:
    """Instance annotations -> thing regions (+ the image's tags in first-seen order)."""
    regions: list[Region] = []
    tags: list[str] = []
    for a in anns:
        box = _clip_box(a.get("bbox", []), w, h)
        if box is None:
            counts["dropped_bad_box"] += 1
            continue
        cat = cats.get(a["category_id"])
        if cat is None:
            counts["dropped_unknown_category"] += 1
            continue
        mask = None
        if a.get("segmentation") is not None:
            try:
                mask = to_rle(a["segmentation"], h, w)
                if rle_area(mask) == 0:
                    # C19: an empty mask carries no pixels to pool; keep the box, drop the mask.
                    counts["dropped_empty_mask"] += 1
                    mask = None
            except MaskError as e:
                counts["dropped_bad_mask"] += 1
                log.warning("annotation %s: %s", a.get("id"), e)
                mask = None
        regions.append(
            Region(
                box=box,
                tags=[cat["tag"]],
                mask=mask,
                source=str(a.get("source", "coco_instances")),
                kind="thing",
                category_id=int(a["category_id"]),
                iscrowd=bool(a.get("iscrowd", 0)),
            )
        )
        counts["regions_thing"] += 1
        counts["masks_thing"] += mask is not None
        if cat["tag"] not in tags:
            tags.append(cat["tag"])
    return regions, tags


def _panoptic_regions(
    pa: dict[str, Any],
    png: bytes,
    cats: dict[int, dict[str, Any]],
    w: int,
    h: int,
    key: str,
    counts: Counter,
) -> tuple[list[Region], dict[str, Any]]:
    """Panoptic segments -> stuff regions (masks from the PNG) and ``Sample.panoptic`` info."""
    ids = decode_panoptic(png, key=key)
    if ids.shape != (h, w):
        raise ValueError(f"{key}: panoptic PNG is {ids.shape[1]}x{ids.shape[0]}, image {w}x{h}")
    regions: list[Region] = []
    segments = []
    for s in pa["segments_info"]:
        cat = cats[s["category_id"]]
        segments.append(
            {
                "id": int(s["id"]),
                "category_id": int(s["category_id"]),
                "category": cat["name"],
                "isthing": cat["isthing"],
                "area": int(s["area"]),
            }
        )
        if cat["isthing"]:
            continue  # things come from the instance annotations
        m = ids == s["id"]
        if not m.any():
            counts["dropped_empty_mask"] += 1
            continue
        rle = encode_mask(np.asarray(m))
        regions.append(
            Region(
                box=rle_box_xyxy(rle),
                tags=[cat["tag"]],
                mask=rle,
                source="coco_panoptic",
                kind="stuff",
                category_id=int(s["category_id"]),
                iscrowd=bool(s.get("iscrowd", 0)),
            )
        )
        counts["regions_stuff"] += 1
    return regions, {"segments": segments}
