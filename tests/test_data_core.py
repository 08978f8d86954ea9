"""Data layer on the real COCO subset: import counts, shard round trip, loader batches."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from umgclip.config import PreprocessConfig
from umgclip.data.coco import import_coco, split_of
from umgclip.data.loader import Batch, DataConfig, build_loader, region_text
from umgclip.data.schema import Sample
from umgclip.data.shards import ShardWriter, SkipCounter, iter_shard_samples, list_shards


def test_import_counts_match_provenance(imported_coco: Path, coco_root: Path) -> None:
    index = json.loads((imported_coco / "index.json").read_text())
    c = index["counts"]
    assert c["images"] == 322
    assert c["captions"] == 1611
    assert c["regions_thing"] == 2836
    assert c["thing_categories"] == 80
    assert c["images_with_panoptic"] == 75
    # PROVENANCE: 847 panoptic segments of which 275 are stuff.
    assert c["regions_stuff"] == 275
    assert len(index["categories"]) == 133
    assert sum(1 for cat in index["categories"] if cat["isthing"]) == 80
    tr, va = index["splits"]["train"], index["splits"]["val"]
    assert tr["images"] + va["images"] == 322
    assert set(tr["keys"]).isdisjoint(va["keys"])
    assert 0.1 < va["images"] / 322 < 0.3
    # The split is a function of the image id alone.
    for k in va["keys"][:10]:
        assert split_of(int(k), 0.2) == "val"
    assert list_shards(imported_coco, "train") and list_shards(imported_coco, "val")


def test_imported_samples_match_annotations(imported_coco: Path, coco_root: Path) -> None:
    inst = json.loads((coco_root / "annotations" / "instances.json").read_text())
    n_by_image: dict[int, int] = {}
    for a in inst["annotations"]:
        n_by_image[a["image_id"]] = n_by_image.get(a["image_id"], 0) + 1
    skips = SkipCounter()
    seen = 0
    for d in iter_shard_samples(list_shards(imported_coco, "val"), skip_counter=skips):
        s = d.sample
        s.validate()
        assert s.split == "val"
        assert d.image.size == (s.width, s.height) and d.image.mode == "RGB"
        things = [r for r in s.regions if r.kind == "thing"]
        assert len(things) == n_by_image[s.source["image_id"]]
        assert set(s.tags) >= {r.tags[0] for r in s.regions}
        if s.panoptic is not None:
            assert d.panoptic is not None and d.panoptic.shape == (s.height, s.width)
            ids = {seg["id"] for seg in s.panoptic["segments"]}
            assert set(map(int, set(d.panoptic.flatten().tolist()) - {0})) <= ids
        seen += 1
    assert skips.total == 0
    assert seen == json.loads((imported_coco / "index.json").read_text())["splits"]["val"]["images"]


def test_shard_writer_is_atomic_and_splits(tmp_path: Path) -> None:
    from data_helpers import jpeg_bytes

    with ShardWriter(tmp_path, "train", max_samples=2) as w:
        for i in range(5):
            s = Sample(key=f"k{i}", width=8, height=6, captions=[f"c{i}"])
            w.write(s, jpeg_bytes(8, 6))
    assert [p.name for p in w.shards] == [
        "train-000000.tar",
        "train-000001.tar",
        "train-000002.tar",
    ]
    assert not list(tmp_path.glob("*.tmp"))
    keys = [d.sample.key for d in iter_shard_samples(w.shards)]
    assert keys == [f"k{i}" for i in range(5)]


def test_shard_writer_aborts_on_error(tmp_path: Path) -> None:
    from data_helpers import jpeg_bytes

    try:
        with ShardWriter(tmp_path, "x", max_samples=10) as w:
            w.write(Sample(key="a", width=4, height=4), jpeg_bytes(4, 4))
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert list(tmp_path.iterdir()) == []


def test_import_is_deterministic(coco_root: Path, tmp_path: Path, imported_coco: Path) -> None:
    # Re-importing gives byte-identical shards (fixed tar metadata, sorted ids).
    idx = import_coco(coco_root, tmp_path, shard_size=1000)
    assert (tmp_path / "val-000000.tar").read_bytes() == (
        imported_coco / "val-000000.tar"
    ).read_bytes()
    assert (
        idx["splits"]["val"]["keys"]
        == json.loads((imported_coco / "index.json").read_text())["splits"]["val"]["keys"]
    )


def test_loader_batch_contract(imported_coco: Path) -> None:
    cfg = DataConfig(
        shards=str(imported_coco), split="val", batch_size=4, masks=True, max_regions=5
    )
    loader = build_loader(cfg, PreprocessConfig(size=64), train=False)
    batch = next(iter(loader))
    assert isinstance(batch, Batch)
    assert batch.images.shape == (4, 3, 64, 64) and batch.images.dtype == torch.float32
    assert len(batch.keys) == len(batch.captions) == len(batch.all_captions) == 4
    assert batch.masks is not None
    for i in range(4):
        k = batch.boxes[i].shape[0]
        assert batch.boxes[i].shape == (k, 4) and k <= 5
        assert batch.masks[i].shape == (k, 64, 64) and batch.masks[i].dtype == torch.bool
        assert len(batch.region_tags[i]) == len(batch.region_texts[i]) == k
        assert batch.captions[i] in batch.all_captions[i]
        b = batch.boxes[i]
        assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
        assert b.min() >= 0 and b.max() <= 64
        for tags, text in zip(batch.region_tags[i], batch.region_texts[i]):
            assert text == f"a photo of a {tags[0]}."


def test_region_text_prefers_caption() -> None:
    assert region_text("a red car parked", ["car"]) == "a red car parked"
    assert region_text("  ", ["car"]) == "a photo of a car."
    assert region_text(None, []) == ""
