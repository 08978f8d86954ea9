"""Counts over a shard folder (``umgclip data stats``), computed by reading the shards."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from umgclip.data.schema import Sample, SchemaError
from umgclip.data.shards import ReadKeys, SkipCounter, iter_raw_samples, list_shards


def shard_stats(shards: str | Path, keys: ReadKeys | None = None) -> dict[str, Any]:
    """Images, captions, regions by kind, images with masks / panoptic, categories, per split.

    Reads only the JSON members (no pixel decoding), so it is fast on large shard sets.
    """
    keys = keys or ReadKeys()
    skips = SkipCounter()
    per_split: dict[str, Counter] = {}
    categories: set[int] = set()
    tags: set[str] = set()
    for raw in iter_raw_samples(list_shards(shards), skips):
        meta = next((raw.members[e] for e in keys.json if e in raw.members), None)
        has_image = any(e in raw.members for e in keys.image)
        if not has_image:
            skips.add("no_image", raw.key)
            continue
        try:
            sample = Sample.from_json(meta) if meta is not None else None
        except (SchemaError, TypeError, ValueError):
            sample = None  # img2dataset metadata JSON, not ours
        split = (sample.split if sample is not None else None) or Path(raw.shard).name.split("-")[0]
        c = per_split.setdefault(split, Counter())
        c["images"] += 1
        if sample is None:
            c["captions"] += any(e in raw.members for e in keys.caption)
            continue
        c["captions"] += len(sample.captions)
        c["empty_captions"] += sum(1 for x in sample.captions if not x.strip())
        for r in sample.regions:
            c[f"regions_{r.kind}"] += 1
            if r.category_id is not None:
                categories.add(r.category_id)
            tags.update(r.tags)
        tags.update(sample.tags)
        c["images_with_masks"] += any(r.mask is not None for r in sample.regions)
        c["images_with_panoptic"] += any(e in raw.members for e in keys.panoptic)
    total: Counter = Counter()
    for c in per_split.values():
        total.update(c)
    return {
        **{k: total.get(k, 0) for k in ("images", "captions", "empty_captions")},
        "regions": {
            k[len("regions_") :]: v for k, v in sorted(total.items()) if k.startswith("regions_")
        },
        "images_with_masks": total.get("images_with_masks", 0),
        "images_with_panoptic": total.get("images_with_panoptic", 0),
        "categories": len(categories),
        "distinct_tags": len(tags),
        "splits": {s: dict(sorted(c.items())) for s, c in sorted(per_split.items())},
        "skipped": skips.to_dict(),
    }
