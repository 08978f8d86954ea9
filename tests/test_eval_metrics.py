"""Metric functions on small hand-made inputs whose answers are worked out by hand here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from umgclip.eval.regions import topk_accuracy
from umgclip.eval.retrieval import retrieval_recall
from umgclip.eval.segmentation import (
    IGNORE_INDEX,
    MeanIoU,
    dense_logits,
    logits_to_label_map,
    panoptic_to_semantic,
)
from umgclip.eval.tagging import tagging_map
from umgclip.eval.vocab import COCO_PANOPTIC, COCO_THINGS, prompt_name

# Captions c0, c1 -> image 0; c2 -> image 1; c3, c4 -> image 2.
CAP_TO_IMG = [0, 0, 1, 2, 2]
# Rows: images, columns: captions.
SIM = torch.tensor(
    [
        [0.1, 0.9, 0.8, 0.0, 0.2],  # img0: c1 first -> hit@1
        [0.7, 0.1, 0.3, 0.6, 0.5],  # img1: c2 ranks 4th -> miss@3, hit@5
        [0.0, 0.2, 0.1, 0.3, 0.9],  # img2: c4 first -> hit@1
    ]
)


def test_retrieval_coco_protocol_hand_worked() -> None:
    # With identity image embeddings, image_emb @ text_emb.T is exactly SIM.
    out = retrieval_recall(torch.eye(3), SIM.T.contiguous(), CAP_TO_IMG, ks=(1, 3, 5))
    assert out["i2t_R@1"] == pytest.approx(100 * 2 / 3)
    assert out["i2t_R@3"] == pytest.approx(100 * 2 / 3)
    assert out["i2t_R@5"] == pytest.approx(100.0)
    # t2i ranks of the right image per caption: c0 2nd, c1 1st, c2 2nd, c3 2nd, c4 1st.
    assert out["t2i_R@1"] == pytest.approx(100 * 2 / 5)
    assert out["t2i_R@3"] == pytest.approx(100.0)
    assert out["num_images"] == 3 and out["num_captions"] == 5


def test_retrieval_any_caption_counts_for_i2t() -> None:
    # Image 0's second caption is its best match: a hit, although its first caption ranks last.
    sim = torch.tensor([[0.0, 1.0, 0.5], [0.2, 0.1, 0.9]])
    out = retrieval_recall(torch.eye(2), sim.T.contiguous(), [0, 0, 1], ks=(1,))
    assert out["i2t_R@1"] == 100.0
    assert out["t2i_R@1"] == pytest.approx(100 * 2 / 3)  # caption 0 ranks image 1 first


def test_retrieval_matches_torchmetrics_hit_rate() -> None:
    from torchmetrics.retrieval import RetrievalHitRate

    g = torch.Generator().manual_seed(0)
    n, per = 12, 3
    img = torch.nn.functional.normalize(torch.randn(n, 8, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(n * per, 8, generator=g), dim=-1)
    cap_to_img = torch.arange(n).repeat_interleave(per)
    ours = retrieval_recall(img, txt, cap_to_img, ks=(1, 5, 10), chunk=5)
    sim = img @ txt.T
    rel = cap_to_img[None, :] == torch.arange(n)[:, None]
    for k in (1, 5, 10):
        m = RetrievalHitRate(top_k=k)
        i2t = m(sim.flatten(), rel.flatten(), indexes=torch.arange(n).repeat_interleave(n * per))
        m = RetrievalHitRate(top_k=k)
        t2i = m(
            sim.T.flatten(), rel.T.flatten(), indexes=torch.arange(n * per).repeat_interleave(n)
        )
        assert ours[f"i2t_R@{k}"] == pytest.approx(100 * i2t.item(), abs=1e-4)
        assert ours[f"t2i_R@{k}"] == pytest.approx(100 * t2i.item(), abs=1e-4)


def test_retrieval_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="no caption"):
        retrieval_recall(torch.eye(3), torch.eye(3)[:2], [0, 1])
    with pytest.raises(ValueError, match="outside"):
        retrieval_recall(torch.eye(2), torch.eye(2), [0, 5])


def test_tagging_map_hand_worked() -> None:
    scores = torch.tensor([[0.9, 0.2, 0.5], [0.8, 0.6, 0.1], [0.3, 0.4, 0.2], [0.1, 0.5, 0.7]])
    targets = torch.tensor([[1, 0, 0], [0, 0, 0], [1, 0, 0], [0, 1, 0]])
    # Class 0 ranking: pos, neg, pos, neg -> AP = (1/1 + 2/3) / 2. Class 1: its one positive
    # ranks 2nd -> AP = 1/2. Class 2 has no positive and is left out.
    out = tagging_map(scores, targets)
    assert out["mAP"] == pytest.approx(100 * ((1 + 2 / 3) / 2 + 0.5) / 2)
    assert out["num_classes"] == 2 and out["num_images"] == 4


def test_topk_accuracy_hand_worked() -> None:
    scores = torch.tensor([[0.9, 0.1, 0.0, 0.0], [0.2, 0.3, 0.5, 0.0], [0.1, 0.2, 0.3, 0.4]])
    targets = torch.tensor([0, 1, 0])
    # Row 0 right at top-1; row 1's target is 2nd; row 2's target is last (4th).
    acc = topk_accuracy(scores, targets, ks=(1, 2, 5))
    assert acc[1] == pytest.approx(100 / 3)
    assert acc[2] == pytest.approx(200 / 3)
    assert acc[5] == pytest.approx(100.0)  # k above the class count means every class


def test_mean_iou_hand_worked() -> None:
    pred = torch.tensor([[0, 0, 1], [1, 2, 2]])
    target = torch.tensor([[0, 1, 1], [1, 2, IGNORE_INDEX]])
    m = MeanIoU(num_classes=4)
    m.update(pred, target)
    out = m.compute()
    # class 0: TP 1, FP 1 -> 1/2; class 1: TP 2, FN 1 -> 2/3; class 2: TP 1 (the ignored pixel
    # does not count as FP) -> 1; class 3: never present -> left out.
    assert out["mIoU"] == pytest.approx(100 * (0.5 + 2 / 3 + 1) / 3)
    assert out["pixel_acc"] == pytest.approx(80.0)
    assert out["num_classes"] == 3
    assert math.isnan(out["iou_per_class"][3])


def test_mean_iou_accumulates_over_images_not_averages() -> None:
    m = MeanIoU(num_classes=2)
    m.update(torch.zeros(1, 4, dtype=torch.long), torch.tensor([[0, 0, 0, 1]]))
    m.update(torch.ones(1, 1, dtype=torch.long), torch.ones(1, 1, dtype=torch.long))
    out = m.compute()
    # Pooled pixels: class 0 TP 3 FN 0 FP 1 -> 3/4; class 1 TP 1, FN 1 -> 1/2.
    assert out["mIoU"] == pytest.approx(100 * (0.75 + 0.5) / 2)


def test_panoptic_to_semantic() -> None:
    ids = np.array([[0, 5, 5], [7, 7, 9]], dtype=np.int32)
    segs = [
        {"id": 5, "category_id": 1},
        {"id": 7, "category_id": 184},
        {"id": 9, "category_id": 12345},  # unknown category -> ignored
    ]
    out = panoptic_to_semantic(ids, segs, {1: 0, 184: 3})
    assert out.tolist() == [[IGNORE_INDEX, 0, 0], [3, 3, IGNORE_INDEX]]


def test_logits_to_label_map_undoes_padding() -> None:
    # A 16x8 (W x H) image resized to 8x4 and padded at the bottom to an 8x8 input; class 1
    # scores high on the left half of the content, class 0 on the right, padding favours 2.
    logits = torch.zeros(3, 8, 8)
    logits[1, :4, :4] = 1.0
    logits[0, :4, 4:] = 1.0
    logits[2, 4:, :] = 5.0
    out = logits_to_label_map(logits, (8, 8), (0, 0, 8, 4), (8, 16))
    assert out.shape == (8, 16)
    assert (out[:, :7] == 1).all() and (out[:, 9:] == 0).all()
    assert not (out == 2).any()  # the padding never leaks into the image


def test_logits_to_label_map_identity_geometry() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 6, 7, generator=g)
    out = logits_to_label_map(logits, (6, 7), (0, 0, 7, 6), (6, 7))
    assert torch.equal(out, logits.argmax(0))


def test_dense_logits_is_cosine() -> None:
    dense = torch.zeros(2, 1, 2)
    dense[:, 0, 0] = torch.tensor([3.0, 0.0])
    dense[:, 0, 1] = torch.tensor([1.0, 1.0])
    cls = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    lg = dense_logits(dense, cls)
    assert lg[:, 0, 0].tolist() == pytest.approx([1.0, 0.0])
    assert lg[:, 0, 1].tolist() == pytest.approx([2**-0.5, 2**-0.5])


def test_vocab_is_coco() -> None:
    assert len(COCO_PANOPTIC) == 133 and len(COCO_THINGS) == 80
    assert len({i for i, _, _ in COCO_PANOPTIC}) == 133
    assert prompt_name("sky-other-merged") == "sky" and prompt_name("wall-brick") == "brick wall"
