"""Eval preprocessing keeps the geometry: boxes and dense maps follow the image back (C20)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from PIL import Image

from umgclip.config import PreprocessConfig
from umgclip.eval.geometry import content_box, prepare
from umgclip.eval.segmentation import logits_to_label_map

PRE = PreprocessConfig(size=32, resize_mode="longest")


@pytest.mark.parametrize("wh", [(80, 40), (40, 80), (64, 64)])
def test_c20_boxes_and_content_round_trip_non_square(wh: tuple[int, int]) -> None:
    w, h = wh
    boxes = torch.tensor([[4.0, 8.0, 20.0, 36.0], [0.0, 0.0, float(w), float(h)]])
    t = prepare(Image.new("RGB", (w, h), (10, 200, 30)), PRE, boxes)
    assert t.image.shape == (3, 32, 32)
    k = 32 / max(w, h)
    x0, y0, x1, y1 = content_box(t.geometry)
    # the content has the image's aspect ratio and is centred in the square input
    assert (x1 - x0, y1 - y0) == pytest.approx((w * k, h * k))
    assert (x0 + x1) / 2 == pytest.approx(16, abs=0.5) and (y0 + y1) / 2 == pytest.approx(
        16, abs=0.5
    )
    assert torch.allclose(t.boxes[1], torch.tensor([x0, y0, x1, y1]))
    assert torch.allclose(t.geometry.boxes_to_original(t.boxes), boxes, atol=1e-4)


@pytest.mark.parametrize("wh", [(80, 40), (40, 80)])
def test_label_map_lands_on_the_right_pixels(wh: tuple[int, int]) -> None:
    # An image whose left half is "class 1" in input space must come back with its left half
    # labelled 1 at full resolution, padding removed, for either orientation.
    w, h = wh
    t = prepare(Image.new("RGB", (w, h)), PRE)
    box = content_box(t.geometry)
    logits = torch.zeros(2, 32, 32)
    mid = round((box[0] + box[2]) / 2)
    logits[1, :, :mid] = 1.0
    logits[0, :, mid:] = 1.0
    out = logits_to_label_map(logits, (32, 32), box, (h, w))
    assert out.shape == (h, w)
    assert (out[:, : w // 2 - 2] == 1).all() and (out[:, w // 2 + 2 :] == 0).all()


def test_centre_crop_content_box_exceeds_input() -> None:
    pre = dataclasses.replace(PRE, resize_mode="shortest")
    t = prepare(Image.new("RGB", (80, 40)), pre)
    # 80x40 -> centre 40x40 crop scaled to 32: the whole image spans x from -16 to 48
    assert content_box(t.geometry) == pytest.approx((-16, 0, 48, 32))
