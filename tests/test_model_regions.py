"""Region embeddings from the dense map: box validation (C17), context (C18), mask pooling."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import umgclip
from umgclip.model.regions import BoxError, validate_boxes

NAN, INF = math.nan, math.inf


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return umgclip.create_model("umg-vit-tiny")


@pytest.fixture(scope="module")
def x():
    torch.manual_seed(1)
    return torch.randn(2, 3, 64, 64)


def _hand_pool(model, x, rows: slice, cols: slice) -> torch.Tensor:
    with torch.no_grad():
        _, dense = model.image_tower.forward_features(x)
        pooled = dense[:, :, rows, cols].mean(dim=(2, 3))
        return F.normalize(model.image_tower.head(pooled), dim=-1)


def test_c18_region_agrees_with_hand_pooling_and_differs_from_crop(model, x):
    # 8x8 grid of 8-px cells; a box on cell borders covering 7x7 cells: RoIAlign(7x7, aligned)
    # samples each cell centre once, so it must equal the plain mean of those cells.
    box = torch.tensor([[8.0, 0.0, 64.0, 56.0]])
    with torch.no_grad():
        got = model.encode_boxes(x, [box, box])
    hand = _hand_pool(model, x, slice(0, 7), slice(1, 8))
    torch.testing.assert_close(torch.cat(got), hand, atol=1e-5, rtol=0)
    # The crop, resized and encoded alone, loses the context: a different embedding.
    crop = F.interpolate(x[:, :, 0:56, 8:64], size=(64, 64), mode="bilinear", align_corners=False)
    with torch.no_grad():
        crop_emb = model.encode_image(crop)
    assert (torch.cat(got) * crop_emb).sum(-1).max() < 0.999
    # And the region embedding depends on pixels outside the box (attention context).
    x2 = x.clone()
    x2[:, :, 56:, :] = 0.0
    with torch.no_grad():
        moved = model.encode_boxes(x2, [box, box])
    assert not torch.allclose(torch.cat(moved), torch.cat(got), atol=1e-4)


def test_c17_empty_box_list(model, x):
    with torch.no_grad():
        out = model.encode_boxes(x, [torch.zeros(0, 4), torch.tensor([[0.0, 0.0, 10.0, 10.0]])])
    assert out[0].shape == (0, 64) and out[1].shape == (1, 64)


@pytest.mark.parametrize(
    "bad, reason",
    [
        ([5.0, 5.0, 5.0, 20.0], "zero_area"),
        ([30.0, 5.0, 10.0, 20.0], "inverted"),
        ([100.0, 100.0, 120.0, 130.0], "outside"),
        ([-20.0, -20.0, -1.0, 30.0], "outside"),
        ([NAN, 0.0, 10.0, 10.0], "non_finite"),
        ([0.0, 0.0, INF, 10.0], "non_finite"),
    ],
)
def test_c17_invalid_boxes_raise_or_drop_aligned(model, x, bad, reason):
    good1, good2 = [0.0, 0.0, 32.0, 32.0], [16.0, 8.0, 60.0, 50.0]
    boxes = [torch.tensor([good1, bad, good2]), torch.tensor([good2])]
    with pytest.raises(BoxError, match=f"box 1 .*{reason}"):
        model.encode_boxes(x, boxes)
    with torch.no_grad():
        out, valid = model.encode_boxes(x, boxes, on_invalid="drop", return_valid=True)
        ref = model.encode_boxes(x, [torch.tensor([good1, good2]), torch.tensor([good2])])
    assert valid[0].tolist() == [True, False, True] and valid[1].tolist() == [True]
    # Output rows are exactly the valid input boxes, in order: nothing shifted.
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
    assert validate_boxes(boxes[0], (64, 64), on_invalid="drop").reasons == {reason: 1}


def test_c17_partly_outside_is_clipped(model, x):
    with torch.no_grad():
        out = model.encode_boxes(x, [torch.tensor([[-30.0, -5.0, 40.0, 200.0]])] * 2)
        ref = model.encode_boxes(x, [torch.tensor([[0.0, 0.0, 40.0, 64.0]])] * 2)
    assert torch.equal(out[0], ref[0])


def test_c17_forward_train_keeps_alignment(model, x):
    boxes = [torch.tensor([[0.0, 0.0, 32.0, 32.0], [NAN, 0, 1, 1]]), torch.tensor([[8, 8, 9, 9.0]])]
    with torch.no_grad():
        out = model.forward_train(x, boxes)
        ref = model.encode_boxes(x, [boxes[0][:1], boxes[1]])
    assert out["region_valid"].tolist() == [True, False, True]
    assert out["region_image"].tolist() == [0, 1]
    assert int(out["regions_dropped"]) == 1
    torch.testing.assert_close(out["regions"], torch.cat(ref))


def test_c17_malformed_inputs(model, x):
    with pytest.raises(ValueError, match="2 images"):
        model.encode_boxes(x, [torch.zeros(0, 4)])
    with pytest.raises(BoxError, match=r"\(K,4\)"):
        model.encode_boxes(x, [torch.zeros(3, 5), torch.zeros(0, 4)])


def test_mask_pooling_matches_hand_pooling(model, x):
    masks = torch.zeros(2, 64, 64, dtype=torch.bool)
    masks[0, 0:32, 0:16] = True  # cells rows 0-3, cols 0-1
    masks[1, 40:64, 24:64] = True  # cells rows 5-7, cols 3-7
    with torch.no_grad():
        out = model.encode_masks(x, [masks, masks[:1]])
    assert out[0].shape == (2, 64) and out[1].shape == (1, 64)
    torch.testing.assert_close(out[0][0], _hand_pool(model, x, slice(0, 4), slice(0, 2))[0])
    torch.testing.assert_close(out[0][1], _hand_pool(model, x, slice(5, 8), slice(3, 8))[0])
    torch.testing.assert_close(out[1][0], _hand_pool(model, x, slice(0, 4), slice(0, 2))[1])


def test_empty_mask_raises_or_drops(model, x):
    masks = torch.zeros(2, 64, 64, dtype=torch.bool)
    masks[1, :8, :8] = True
    with pytest.raises(ValueError, match="mask 0 is empty"):
        model.encode_masks(x, [masks, masks])
    with torch.no_grad():
        out, valid = model.encode_masks(x, [masks, masks], on_invalid="drop", return_valid=True)
    assert out[0].shape == (1, 64) and valid[0].tolist() == [False, True]
