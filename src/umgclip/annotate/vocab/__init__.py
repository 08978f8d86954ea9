"""Shipped vocabularies: ``default.txt`` (133 COCO panoptic + 1000 ImageNet names) and
``imagenet_to_coco.txt``. Regenerate with ``benchmarks/make_annotate_vocab.py``."""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

HERE = Path(__file__).resolve().parent


def clean_coco_name(name: str) -> str:
    """COCO panoptic stuff names carry merge suffixes (``wall-other-merged``, ``tree-merged``):
    strip them so they read as words in prompts and match across sources."""
    n = re.sub(r"-(other-merged|merged|other|stuff)$", "", name.strip())
    return n.replace("-", " ")


def load_vocabulary(name_or_path: str = "default") -> list[str]:
    """Names, one a line (``#`` comments and blanks skipped, duplicates dropped, order kept)."""
    path = HERE / "default.txt" if name_or_path == "default" else Path(name_or_path)
    if not path.is_file():
        raise FileNotFoundError(f"vocabulary file not found: {path}")
    out: list[str] = []
    seen: set[str] = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#") and line not in seen:
            seen.add(line)
            out.append(line)
    if not out:
        raise ValueError(f"vocabulary {path} is empty")
    return out


@lru_cache(maxsize=1)
def imagenet_to_coco() -> dict[int, str]:
    """ImageNet-1k class index -> COCO category name (only classes with a clear COCO parent)."""
    table: dict[int, str] = {}
    for line in (HERE / "imagenet_to_coco.txt").read_text(encoding="utf-8").splitlines():
        if line.startswith("#") or not line.strip():
            continue
        idx, _, coco = line.split("\t")
        table[int(idx)] = coco
    return table
