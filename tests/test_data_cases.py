"""CASES owned by the data layer: C01-C05, C19, C21-C23 (inputs built here, nothing binary)."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_helpers import image_bytes, jpeg_bytes, write_tar
from umgclip.config import PreprocessConfig
from umgclip.data.images import ImageDecodeError, decode_image
from umgclip.data.loader import DataConfig, build_loader
from umgclip.data.masks import decode_rle, encode_mask, to_rle
from umgclip.data.schema import Sample
from umgclip.data.shards import (
    ReadKeys,
    ShardFormatError,
    ShardWriter,
    SkipCounter,
    iter_shard_samples,
)
from umgclip.data.transforms import AugmentConfig, build_eval_transform, build_train_transform


# ---------------------------------------------------------------------------------- images
@pytest.mark.parametrize(
    "mode,fmt", [("RGBA", "PNG"), ("LA", "PNG"), ("P", "PNG"), ("CMYK", "JPEG")]
)
def test_c01_modes_decode_to_rgb(mode: str, fmt: str) -> None:
    im = decode_image(image_bytes(20, 10, mode, fmt), key="k")
    assert im.mode == "RGB" and im.size == (20, 10)
    x = build_eval_transform(PreprocessConfig(size=32)).image_only(im)
    assert x.shape == (3, 32, 32)


def test_c01_alpha_composited_on_white() -> None:
    arr = np.zeros((4, 4, 4), dtype=np.uint8)
    arr[..., 0] = 200  # red channel
    arr[:2, :, 3] = 0  # top half transparent
    arr[2:, :, 3] = 255  # bottom half opaque
    buf = io.BytesIO()
    Image.fromarray(arr, "RGBA").save(buf, format="PNG")
    out = np.asarray(decode_image(buf.getvalue()))
    assert (out[:2] == 255).all()  # transparent -> white background
    assert (out[2:] == [200, 0, 0]).all()  # opaque pixels unchanged


def test_c01_palette_with_transparency() -> None:
    im = Image.new("P", (4, 4), 0)
    im.putpalette([10, 20, 30] + [0] * 765)
    buf = io.BytesIO()
    im.save(buf, format="PNG", transparency=0)
    assert (np.asarray(decode_image(buf.getvalue())) == 255).all()


def test_c02_grayscale_replicated() -> None:
    g = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    buf = io.BytesIO()
    Image.fromarray(g, "L").save(buf, format="PNG")
    out = np.asarray(decode_image(buf.getvalue()))
    assert out.shape == (3, 4, 3)
    for c in range(3):
        assert (out[..., c] == g).all()


def test_c04_truncated_jpeg_names_key() -> None:
    data = jpeg_bytes(64, 64)
    with pytest.raises(ImageDecodeError, match="key 'bad01'"):
        decode_image(data[: len(data) // 2], key="bad01")
    with pytest.raises(ImageDecodeError, match="bad02"):
        decode_image(b"\xff\xd8garbage", key="bad02")


def test_c05_decompression_bomb_refused_from_header() -> None:
    # A PNG whose header declares 30000 x 30000 (900 MP) but compresses to a few hundred KB.
    im = Image.new("1", (30000, 30000))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    data = buf.getvalue()
    assert len(data) < 2_000_000
    with pytest.raises(ImageDecodeError, match="decompression-bomb"):
        decode_image(data, key="bomb", max_pixels=100_000_000)
    # The limit is configurable: a small one refuses an ordinary image too.
    with pytest.raises(ImageDecodeError, match="above the limit"):
        decode_image(jpeg_bytes(100, 100), max_pixels=5000)


def test_c05_bomb_in_shard_is_skipped(tmp_path: Path) -> None:
    big = io.BytesIO()
    Image.new("1", (20000, 20000)).save(big, format="PNG")
    shard = write_tar(
        tmp_path / "s-000000.tar",
        [("a.png", big.getvalue()), ("a.txt", b"x"), ("b.jpg", jpeg_bytes(8, 8)), ("b.txt", b"y")],
    )
    skips = SkipCounter()
    out = list(iter_shard_samples([shard], skip_counter=skips, max_pixels=10_000_000))
    assert [d.sample.key for d in out] == ["b"]
    assert skips.counts["bad_image"] == 1


# ---------------------------------------------------------------------------------- sizes
@pytest.mark.parametrize("mode", ["shortest", "longest", "squash"])
@pytest.mark.parametrize("hw", [(1, 1), (1, 1000), (1000, 1), (300, 500), (500, 300)])
def test_c03_extreme_sizes_give_configured_size(mode: str, hw: tuple[int, int]) -> None:
    h, w = hw
    img = torch.randint(0, 256, (3, h, w), dtype=torch.uint8)
    boxes = torch.tensor([[0.0, 0.0, float(w), float(h)]])
    masks = torch.ones((1, h, w), dtype=torch.bool)
    t = build_eval_transform(PreprocessConfig(size=32, resize_mode=mode))(img, boxes, masks)
    assert t.image.shape == (3, 32, 32)
    assert t.masks is not None and t.masks.shape[1:] == (32, 32)
    if t.boxes.shape[0]:
        # The whole-image box maps onto the (visible) content area and back.
        back = t.geometry.boxes_to_original(t.boxes)
        top, left, ch, cw = t.geometry.crop
        assert torch.allclose(
            back, torch.tensor([[left, top, left + cw, top + ch]]).float(), atol=1e-3
        )


@pytest.mark.parametrize("mode", ["shortest", "longest"])
def test_c03_orientation_symmetry(mode: str) -> None:
    # Transposing the input transposes the output geometry: one logic for both orientations.
    tf = build_eval_transform(PreprocessConfig(size=40, resize_mode=mode))
    g1 = tf.plan(300, 500)
    g2 = tf.plan(500, 300)
    assert g1.crop == (g2.crop[1], g2.crop[0], g2.crop[3], g2.crop[2])
    assert g1.scale == (g2.scale[1], g2.scale[0])
    assert g1.pad == (g2.pad[1], g2.pad[0])


def test_c03_boxes_and_masks_follow_flip_and_crop() -> None:
    h, w = 60, 100
    masks = torch.zeros((1, h, w), dtype=torch.bool)
    masks[0, 10:30, 5:25] = True  # box [5, 10, 25, 30]
    boxes = torch.tensor([[5.0, 10.0, 25.0, 30.0]])
    aug = AugmentConfig(random_resized_crop=False, hflip=1.0)
    tf = build_train_transform(PreprocessConfig(size=50, resize_mode="squash"), aug)
    t = tf(torch.zeros((3, h, w), dtype=torch.uint8), boxes, masks)
    assert t.geometry.flip
    from torchvision.ops import masks_to_boxes

    mb = masks_to_boxes(t.masks) + torch.tensor([0, 0, 1, 1])  # inclusive -> pixel edges
    assert torch.allclose(t.boxes, mb, atol=1.0)
    assert t.boxes[0, 0] > 25  # the object moved to the right half


# ---------------------------------------------------------------------------------- masks
def test_c19_rle_polygon_and_uncompressed_decode_consistently() -> None:
    h, w = 40, 50
    m = np.zeros((h, w), dtype=bool)
    m[5:25, 10:30] = True
    poly = [[10, 5, 30, 5, 30, 25, 10, 25]]
    from pycocotools import mask as mu

    compressed = encode_mask(m)
    uncompressed = {"size": [h, w], "counts": list(_runs(m))}
    raw_bytes = dict(mu.encode(np.asfortranarray(m.astype(np.uint8))))
    raw_bytes["counts"] = raw_bytes["counts"]  # bytes counts
    for seg in (compressed, uncompressed, raw_bytes):
        assert (decode_rle(to_rle(seg, h, w)) == m).all()
    # Polygons rasterise the same square (pycocotools includes the boundary differently: 1 px).
    pm = decode_rle(to_rle(poly, h, w))
    assert abs(int(pm.sum()) - int(m.sum())) <= 2 * (20 + 20) + 1
    assert (pm & m).sum() >= 0.9 * m.sum()


def _runs(m: np.ndarray) -> list[int]:
    """COCO uncompressed RLE (column-major run lengths starting with zeros), by hand."""
    flat = m.flatten(order="F").astype(np.uint8)
    runs, cur, n = [], 0, 0
    for v in flat:
        if v == cur:
            n += 1
        else:
            runs.append(n)
            cur, n = v, 1
    runs.append(n)
    return runs


def test_c19_empty_mask_dropped_with_count(tmp_path: Path) -> None:
    import json

    from umgclip.data.coco import import_coco

    root = tmp_path / "coco"
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    (root / "images" / "1.jpg").write_bytes(jpeg_bytes(40, 30))
    images = [{"id": 1, "file_name": "1.jpg", "width": 40, "height": 30}]
    cats = [{"id": 1, "name": "person", "supercategory": "person"}]
    empty = encode_mask(np.zeros((30, 40), dtype=bool))
    anns = [
        {
            "id": 1,
            "image_id": 1,
            "category_id": 1,
            "bbox": [1, 1, 10, 10],
            "iscrowd": 0,
            "segmentation": [[1, 1, 11, 1, 11, 11, 1, 11]],
        },
        {
            "id": 2,
            "image_id": 1,
            "category_id": 1,
            "bbox": [5, 5, 10, 10],
            "iscrowd": 0,
            "segmentation": empty,
        },
        {
            "id": 3,
            "image_id": 1,
            "category_id": 1,
            "bbox": [50, 50, 5, 5],
            "iscrowd": 0,
            "segmentation": [[50, 50, 55, 50, 55, 55]],
        },  # wholly outside: bad box
    ]
    (root / "annotations" / "captions.json").write_text(
        json.dumps(
            {"images": images, "annotations": [{"id": 1, "image_id": 1, "caption": "a person"}]}
        )
    )
    (root / "annotations" / "instances.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": cats})
    )
    idx = import_coco(root, tmp_path / "out", val_fraction=0.0)
    assert idx["counts"]["dropped_empty_mask"] == 1
    assert idx["counts"]["dropped_bad_box"] == 1
    (d,) = list(iter_shard_samples(sorted((tmp_path / "out").glob("*.tar"))))
    masks = [r.mask is not None for r in d.sample.regions]
    assert masks == [True, False]


# ---------------------------------------------------------------------------------- shards
def test_c21_img2dataset_style_members(tmp_path: Path) -> None:
    shard = write_tar(
        tmp_path / "x-000000.tar",
        [
            ("0001.png", image_bytes(10, 8, "RGBA", "PNG")),
            ("0001.txt", b"a cat"),
            ("0001.json", b'{"url": "http://x", "status": "success"}'),
            ("0002.jpeg", jpeg_bytes(9, 7)),
            ("0002.cls", b"3"),
            ("0003.webp", image_bytes(6, 6, "RGB", "WEBP")),
            ("0003.txt", b"a dog"),
            ("0004.txt", b"caption without image"),
        ],
    )
    skips = SkipCounter()
    out = list(iter_shard_samples([shard], skip_counter=skips))
    assert [d.sample.key for d in out] == ["0001", "0002", "0003"]
    assert (
        out[0].sample.captions == ["a cat"]
        and out[0].sample.source["metadata"]["url"] == "http://x"
    )
    assert out[1].sample.captions == [] and out[1].sample.source["cls"] == 3
    assert out[2].image.size == (6, 6)
    assert skips.counts["no_image"] == 1
    # Requiring captions skips the .cls-only sample, counted.
    skips2 = SkipCounter()
    keys = ReadKeys(require=("image", "caption"))
    got = [d.sample.key for d in iter_shard_samples([shard], keys=keys, skip_counter=skips2)]
    assert got == ["0001", "0003"] and skips2.counts["no_caption"] == 1


def test_c21_configurable_keys_and_fail_fast(tmp_path: Path) -> None:
    members = []
    for i in range(10):
        members += [(f"{i:04d}.image", jpeg_bytes(8, 8, seed=i)), (f"{i:04d}.caption", b"hi")]
    shard = write_tar(tmp_path / "y-000000.tar", members)
    with pytest.raises(ShardFormatError, match=r"\.caption.*\.image|\.image.*\.caption"):
        list(iter_shard_samples([shard], keys=ReadKeys(max_consecutive_missing=5)))
    keys = ReadKeys(image=("image",), caption=("caption",))
    out = list(iter_shard_samples([shard], keys=keys))
    assert len(out) == 10 and out[0].sample.captions == ["hi"]


def test_c22_fewer_shards_than_readers_balanced(imported_coco: Path) -> None:
    cfg = DataConfig(shards=str(imported_coco), split="val", batch_size=4, shuffle_buffer=0)
    pre = PreprocessConfig(size=32)
    with pytest.warns(UserWarning, match="every reader scans all shards"):
        loaders = [build_loader(cfg, pre, train=False, rank=r, world_size=2) for r in range(2)]
    keys = [[k for b in ld for k in b.keys] for ld in loaders]
    n_val = sum(1 for _ in iter_shard_samples(sorted(imported_coco.glob("val-*.tar"))))
    assert set(keys[0]).isdisjoint(keys[1])
    assert len(keys[0]) + len(keys[1]) == n_val
    assert abs(len(keys[0]) - len(keys[1])) <= 1


def test_c22_two_workers_one_shard_read_each_sample_once(imported_coco: Path) -> None:
    cfg = DataConfig(
        shards=str(imported_coco), split="val", batch_size=8, workers=2, shuffle_buffer=0
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loader = build_loader(cfg, PreprocessConfig(size=32), train=False)
    keys = [k for b in loader for k in b.keys]
    n_val = sum(1 for _ in iter_shard_samples(sorted(imported_coco.glob("val-*.tar"))))
    assert len(keys) == len(set(keys)) == n_val


def test_c23_truncated_shard_keeps_readable_samples(tmp_path: Path, caplog) -> None:
    with ShardWriter(tmp_path, "t", max_samples=100) as w:
        for i in range(6):
            w.write(Sample(key=f"s{i}", width=16, height=16, captions=["c"]), jpeg_bytes(16, 16, i))
    data = w.shards[0].read_bytes()
    # Cut inside the 5th sample's image member.
    cut = data.index(b"s4.jpg") + 512 + 100
    bad = tmp_path / "cut-000000.tar"
    bad.write_bytes(data[:cut])
    skips = SkipCounter()
    with caplog.at_level("WARNING"):
        out = [d.sample.key for d in iter_shard_samples([bad, w.shards[0]], skip_counter=skips)]
    assert out[:4] == ["s0", "s1", "s2", "s3"]
    assert out[4:] == [f"s{i}" for i in range(6)]  # the next shard is still read
    assert skips.counts["truncated_shard"] == 1
    assert "read 4 complete samples" in caplog.text
    assert "truncated_shard" in skips.summary()


def test_c04_corrupt_jpeg_in_shard_skipped_counted(tmp_path: Path, caplog) -> None:
    good = jpeg_bytes(16, 16)
    shard = write_tar(
        tmp_path / "c-000000.tar",
        [
            ("a.jpg", good),
            ("a.txt", b"x"),
            ("b.jpg", good[: len(good) // 3]),
            ("b.txt", b"y"),
            ("c.jpg", b"not a jpeg"),
            ("c.txt", b"z"),
            ("d.jpg", good),
            ("d.txt", b"w"),
        ],
    )
    skips = SkipCounter()
    with caplog.at_level("WARNING"):
        out = [d.sample.key for d in iter_shard_samples([shard], skip_counter=skips)]
    assert out == ["a", "d"]
    assert skips.counts["bad_image"] == 2
    assert "'b'" in caplog.text and "'c'" in caplog.text
    assert skips.summary().startswith("skipped 2 samples")


def test_c21_img2dataset_shards_without_split_names_read_with_default_config(tmp_path) -> None:
    import io as _io
    import tarfile as _tarfile

    from PIL import Image as _Image

    from umgclip.config import PreprocessConfig
    from umgclip.data.loader import DataConfig, build_loader
    from umgclip.data.shards import list_shards

    d = tmp_path / "i2d"
    d.mkdir()
    with _tarfile.open(d / "00000.tar", "w") as tar:
        for i in range(3):
            buf = _io.BytesIO()
            _Image.new("RGB", (32, 24), (10 * i, 50, 90)).save(buf, format="JPEG")
            for name, data in ((f"{i:05d}.jpg", buf.getvalue()), (f"{i:05d}.txt", b"a caption")):
                info = _tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, _io.BytesIO(data))
    # DataConfig's default split is "train": shards with no split name are all used.
    assert list_shards(d, "train") == [d / "00000.tar"]
    assert list_shards(d / "00000.tar", "val") == [d / "00000.tar"]
    batch = next(
        iter(build_loader(DataConfig(shards=str(d), batch_size=3), PreprocessConfig(size=32)))
    )
    assert batch.images.shape == (3, 3, 32, 32) and batch.captions == ["a caption"] * 3
    # A split-organised folder still filters, and a missing split is an error.
    (d / "00000.tar").rename(d / "train-000000.tar")
    assert list_shards(d, "train") == [d / "train-000000.tar"]
    with pytest.raises(FileNotFoundError, match="split 'val'"):
        list_shards(d, "val")
