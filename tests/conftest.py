"""Shared fixtures. Tests read the real COCO subset from ../shared/data (or $UMGCLIP_DATA) and
build everything else (images, shards, tiny models) themselves."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def coco_root() -> Path:
    from umgclip.paths import find_coco_mg

    root = find_coco_mg()
    if root is None:
        pytest.fail(
            "the shipped COCO subset was not found: set UMGCLIP_DATA to the folder holding "
            "coco_mg/ (or run from a checkout next to shared/data)"
        )
    return root


@pytest.fixture(scope="session")
def imported_coco(coco_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """coco_mg imported once per test session into webdataset shards."""
    from umgclip.data.coco import import_coco

    out = tmp_path_factory.mktemp("coco_shards")
    import_coco(coco_root, out)
    return out
