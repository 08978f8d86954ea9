"""Adaptation: Convpass / conv bypass, decoders, matcher, panoptic inference, PQ, open-vocab
ensemble, and an end-to-end ``umgclip adapt`` run on real panoptic images."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from umgclip.adapt.adapters import adapters_disabled, add_adapters, is_adapter_param
from umgclip.adapt.config import AdaptConfig, AdapterConfig
from umgclip.adapt.data import ClassVocab
from umgclip.adapt.metrics import PanopticMeter, panoptic_to_pairs
from umgclip.adapt.openvocab import geometric_ensemble, mask_pool
from umgclip.model.decoders.matcher import hungarian_match, pairwise_bce, pairwise_dice
from umgclip.model.decoders.panoptic import PanopticTarget, panoptic_inference, panoptic_loss


def _tiny_vit():
    from open_clip.model import CLIPVisionCfg, _build_vision_tower

    torch.manual_seed(0)
    cfg = CLIPVisionCfg(layers=2, width=64, head_width=32, patch_size=16, image_size=64)
    return _build_vision_tower(32, cfg).eval()


def _perturb_adapters(model):
    # Non-zero up-projections so the bypasses actually change the output.
    for n, p in model.named_parameters():
        if is_adapter_param(n) and ".up." in n:
            torch.nn.init.normal_(p, std=0.5)


# ------------------------------------------------------------------ Convpass / bypass


def test_convpass_identity_at_step0_vit():
    v = _tiny_vit()
    for p in v.parameters():  # freezing alone can switch attention kernels: compare like to like
        p.requires_grad_(False)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = v(x)
    info = add_adapters(v, AdapterConfig(hidden=8, scale=0.1))
    assert info.kind == "convpass" and info.n_adapters == 4
    with torch.no_grad():
        assert torch.equal(v(x), ref)
    _perturb_adapters(v)
    with torch.no_grad():
        assert not torch.allclose(v(x), ref)
        with adapters_disabled(v):
            assert torch.equal(v(x), ref)


def test_convpass_counts_and_cls_token_path():
    from umgclip.model.convpass import Convpass

    cp = Convpass(16, hidden=4, grid=(3, 3), scale=1.0)
    torch.nn.init.normal_(cp.up.weight)
    x = torch.randn(2, 10, 16)
    y = cp(x)
    # The class token only sees the 3x3 kernel's centre tap: changing patches leaves it alone.
    x2 = x.clone()
    x2[:, 1:] += torch.randn_like(x2[:, 1:])
    assert torch.allclose(cp(x2)[:, 0], y[:, 0])
    assert not torch.allclose(cp(x2)[:, 1:], y[:, 1:])
    with pytest.raises(ValueError, match="patch grid"):
        cp(torch.randn(1, 7, 16))
    v = _tiny_vit()
    total0 = sum(p.numel() for p in v.parameters())
    info = add_adapters(v, AdapterConfig(hidden=8))
    per = (64 * 8 + 8) + (8 * 64 + 64) + (8 * 8 * 9 + 8)  # down, up, 3x3 conv (+ biases)
    assert info.trainable == 4 * per and info.total == total0 + 4 * per


def test_conv_bypass_identity_at_step0_cnn():
    import timm

    m = timm.create_model("efficientnet_lite0", pretrained=False, num_classes=0).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = m(x)
    info = add_adapters(m, AdapterConfig(hidden=4), probe_size=64)
    assert info.kind == "conv_bypass" and info.n_adapters == len(m.blocks)
    assert all(not p.requires_grad for n, p in m.named_parameters() if not is_adapter_param(n))
    with torch.no_grad():
        assert torch.equal(m(x), ref)
    _perturb_adapters(m)
    with torch.no_grad():
        assert not torch.allclose(m(x), ref)
    m2 = timm.create_model("efficientnet_lite0", pretrained=False, num_classes=0).eval()
    info2 = add_adapters(m2, AdapterConfig(hidden=4, cnn_skip_stages=2), probe_size=64)
    assert info2.n_adapters == len(m2.blocks) - 2 and info2.trainable < info.trainable


# ------------------------------------------------------------------ matcher, losses, inference


def test_matcher_on_hand_made_cost():
    cost = torch.tensor([[4.0, 1.0, 3.0], [2.0, 0.0, 5.0], [3.0, 2.0, 2.0], [9.0, 9.0, 9.0]])
    # Hand-worked optimum: q0->t1 (1), q1->t0 (2), q2->t2 (2) = 5; greedy would pick q1->t1 first.
    pi, ti = hungarian_match(cost)
    assert pi.tolist() == [0, 1, 2] and ti.tolist() == [1, 0, 2]
    assert float(cost[pi, ti].sum()) == 5.0
    with pytest.raises(ValueError, match="NaN"):
        hungarian_match(torch.tensor([[float("nan")]]))


def test_pairwise_costs_match_direct_computation():
    torch.manual_seed(0)
    q, t = torch.randn(3, 20), (torch.rand(2, 20) > 0.5).float()
    bce, dice = pairwise_bce(q, t), pairwise_dice(q, t)
    for i in range(3):
        for j in range(2):
            assert torch.isclose(
                bce[i, j], F.binary_cross_entropy_with_logits(q[i], t[j]), atol=1e-5
            )
            p = q[i].sigmoid()
            d = 1 - (2 * (p * t[j]).sum() + 1) / (p.sum() + t[j].sum() + 1)
            assert torch.isclose(dice[i, j], d, atol=1e-5)


def test_panoptic_loss_prefers_matching_prediction():
    masks = torch.zeros(2, 8, 8, dtype=torch.bool)
    masks[0, :4] = True
    masks[1, 4:] = True
    tgt = [PanopticTarget(torch.tensor([0, 2]), masks)]
    logits = torch.full((1, 3, 4), -5.0)
    good = torch.where(masks, 8.0, -8.0).float()
    pred_masks = torch.stack([good[1], torch.zeros(8, 8), good[0]])[None]
    logits[0, 0, 2] = logits[0, 2, 0] = 5.0  # query 0 = class 2 (mask 1), query 2 = class 0
    logits[0, 1, 3] = 5.0  # query 1 = no object
    good_loss = panoptic_loss({"pred_logits": logits, "pred_masks": pred_masks}, tgt)
    bad = panoptic_loss({"pred_logits": logits.flip(1), "pred_masks": pred_masks}, tgt)
    assert good_loss["loss"] < 0.5 * bad["loss"]
    assert good_loss["dice"] < 0.01 and good_loss["ce"] < 0.05


def test_panoptic_inference_merges_stuff_and_drops_overlap():
    k = 3  # classes 0 (thing), 1 (stuff), 2 (thing); index 3 = no object
    is_thing = torch.tensor([True, False, True])
    probs = torch.tensor(
        [[0.9, 0.05, 0.03, 0.02], [0.05, 0.9, 0.03, 0.02], [0.02, 0.9, 0.05, 0.03],
         [0.01, 0.01, 0.01, 0.97], [0.1, 0.1, 0.75, 0.05]]
    )  # fmt: skip
    m = torch.full((5, 4, 4), -10.0)
    m[0, :2, :2] = 10  # thing 0 at top-left
    m[1, :2, 2:] = 10  # stuff 1 at top-right
    m[2, 2:, :2] = 10  # more stuff 1 bottom-left: merged with query 1's segment
    m[3] = 10  # "no object" query everywhere: dropped
    m[4, :2, :2] = 10  # thing 2 hidden under query 0 (lower score): drops by overlap
    m[4, 3, 3] = 10
    r = panoptic_inference(probs[:, : k + 1], m, is_thing, 0.5, 0.8)
    cats = sorted((s["category"], s["area"]) for s in r.segments)
    assert cats == [(0, 4), (1, 8)]
    stuff = next(s for s in r.segments if s["category"] == 1)
    assert int((r.segmentation == stuff["id"]).sum()) == 8
    assert int((r.segmentation == 0).sum()) == 4  # bottom-right: nobody's (q4 lost its segment)


def test_pq_on_hand_worked_example():
    # GT: thing 0 (ids 1, 2: two 2x2 blocks on top), stuff 2 (id 3: bottom half).
    # Pred: instance 1 exact (IoU 1), instance 2 shrunk to one column (IoU 0.5: not a match),
    # stuff takes the other column too (IoU 8/10 = 0.8).
    # Class 0: TP 1, FP 1, FN 1 -> PQ = 1/(1+0.5+0.5) = 0.5, SQ 1, RQ 0.5.
    # Class 2: TP 1 -> PQ = SQ = 0.8, RQ 1. Means: PQ 0.65, SQ 0.9, RQ 0.75.
    gt = torch.tensor([[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 3, 3], [3, 3, 3, 3]])
    pr = torch.tensor([[1, 1, 3, 2], [1, 1, 3, 2], [3, 3, 3, 3], [3, 3, 3, 3]])
    segs = [{"id": 1, "category": 0}, {"id": 2, "category": 0}, {"id": 3, "category": 2}]
    m = PanopticMeter(things=[0, 1], stuffs=[2])
    m.update(panoptic_to_pairs(pr, segs, m.unpredicted), panoptic_to_pairs(gt, segs, m.void))
    r = m.compute()
    assert r["n"] == 2
    assert r["PQ"] == pytest.approx(0.65) and r["SQ"] == pytest.approx(0.9)
    assert r["RQ"] == pytest.approx(0.75)
    assert m.compute([2])["PQ"] == pytest.approx(0.8)
    # Predicting nothing: every ground-truth segment is a false negative (COCO), PQ 0, not NaN.
    empty = PanopticMeter(things=[0, 1], stuffs=[2])
    nothing = panoptic_to_pairs(torch.zeros_like(pr), [], empty.unpredicted)
    empty.update(nothing, panoptic_to_pairs(gt, segs, empty.void))
    assert empty.compute() == {"PQ": 0.0, "SQ": 0.0, "RQ": 0.0, "n": 2}
    assert int(empty.metric.false_negatives.sum()) == 3


def test_geometric_ensemble_math():
    p_in = torch.tensor([[0.5, 0.2, 0.1, 0.2]])  # 3 classes + void (0.2)
    p_out = torch.tensor([[0.1, 0.3, 0.6]])
    seen = torch.tensor([True, True, False])
    out = geometric_ensemble(p_in, p_out, seen, alpha=0.4, beta=0.8)
    raw = [0.5**0.6 * 0.1**0.4, 0.2**0.6 * 0.3**0.4, 0.1**0.2 * 0.6**0.8]
    expect = [v / sum(raw) * 0.8 for v in raw] + [0.2]
    assert out[0].tolist() == pytest.approx(expect, rel=1e-5)
    assert float(out.sum()) == pytest.approx(1.0)
    # alpha = beta = 0 gives back the in-vocabulary distribution.
    same = geometric_ensemble(p_in, p_out, seen, 0.0, 0.0)
    assert same[0, :3].tolist() == pytest.approx((p_in[0, :3] / p_in[0, :3].sum() * 0.8).tolist())
    with pytest.raises(ValueError):
        geometric_ensemble(p_in, p_out[:, :2], seen[:2])


def test_mask_pool_matches_hand_pooling():
    dense = torch.randn(1, 5, 4, 4)
    logits = torch.full((1, 1, 4, 4), -30.0)
    logits[0, 0, 1:3, 1:3] = 30.0
    got = mask_pool(dense, logits)[0, 0]
    ref = F.normalize(dense[0, :, 1:3, 1:3].mean((-1, -2)), dim=0)
    assert torch.allclose(got, ref, atol=1e-5)


# ------------------------------------------------------------------ adapted model


@pytest.fixture(scope="module")
def vit_backbone_dir(tmp_path_factory):
    import umgclip

    d = tmp_path_factory.mktemp("bb") / "umg-vit-tiny"
    torch.manual_seed(0)
    umgclip.create_model("umg-vit-tiny").save_pretrained(d)
    return d


def _adapted(backbone_dir, task, holdout=(), num_queries=6):
    import umgclip
    from umgclip.adapt.model import AdaptedModel, class_embeddings

    cfg = AdaptConfig(backbone=str(backbone_dir), task=task)
    cfg.data.size = 64
    cfg.decoder.dim = 32
    cfg.decoder.num_queries = num_queries
    cfg.decoder.layers = 1
    vocab = ClassVocab.coco_panoptic(list(holdout))
    bb = umgclip.load_model(backbone_dir).eval()
    return AdaptedModel(bb, cfg, vocab, class_embeddings(bb, vocab.names, torch.device("cpu")))


def test_frozen_bit_identical_and_grads_only_on_adapters_and_decoder(vit_backbone_dir):
    from umgclip.adapt.data import PanopticItem
    from umgclip.adapt.train import train_steps

    model = _adapted(vit_backbone_dir, "panoptic")
    frozen = {
        n: p.detach().clone()
        for n, p in model.backbone.named_parameters()
        if not is_adapter_param(n)
    }
    adapters0 = {
        n: p.detach().clone() for n, p in model.backbone.named_parameters() if is_adapter_param(n)
    }
    torch.manual_seed(1)
    items = []
    for i in range(3):
        seg = torch.zeros(64, 64, dtype=torch.long)
        seg[: 20 + 5 * i] = 1
        seg[40:, 30:] = 2
        items.append(PanopticItem(f"k{i}", torch.randn(3, 64, 64), seg, seg, [0, 120], (64, 64)))
    x = torch.stack([it.image for it in items])
    model.train()
    out = model(x)
    (out["pred_logits"].sum() + out["pred_masks"].sum()).backward()
    for n, p in model.named_parameters():
        has = p.grad is not None and bool(p.grad.abs().sum() > 0)
        trainable = n.startswith("decoder.") or is_adapter_param(n)
        assert p.requires_grad == trainable, n
        if not trainable:
            assert p.grad is None, n
        elif ".up." in n:  # zero-init up-projections get the first gradient
            assert has, n
    model.zero_grad(set_to_none=True)
    model.cfg.train.steps = 3
    model.cfg.train.batch_size = 2
    model.cfg.train.warmup = 1
    losses = train_steps(model, items, model.cfg)
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    for n, p in model.backbone.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    moved = [
        n
        for n, p in model.backbone.named_parameters()
        if n in adapters0 and not torch.equal(p, adapters0[n])
    ]
    assert moved, "adapters did not train"
    assert any(".up." in n for n in moved)


def test_semseg_decoder_shapes_and_untrained_mIoU_keys(vit_backbone_dir):
    from umgclip.adapt.data import PanopticItem
    from umgclip.adapt.evaluate import evaluate_adapted

    model = _adapted(vit_backbone_dir, "semseg", holdout=["dog"])
    x = torch.randn(2, 3, 64, 64)
    assert model(x).shape == (2, 133, 8, 8)
    sem = torch.zeros(64, 64, dtype=torch.long)
    sem[32:] = 5
    item = PanopticItem("a", x[0], sem, sem + 1, [0], (48, 64))
    res = evaluate_adapted(model, [item], precision="fp32")
    assert 0.0 <= res["semseg/mIoU_adapted"] <= 100.0
    assert 0.0 <= res["semseg/mIoU_zeroshot"] <= 100.0


@pytest.mark.slow
def test_adapt_end_to_end_on_real_panoptic_images(imported_coco, vit_backbone_dir, tmp_path):
    from safetensors.torch import load_file

    from umgclip.adapt.cli import register  # noqa: F401  (the CLI entry imports)
    from umgclip.adapt.model import ADAPTED_WEIGHTS, load_adapted
    from umgclip.adapt.train import adapt
    from umgclip.cli import main

    for task in ("semseg", "panoptic"):
        out = tmp_path / task
        rc = main([
            "adapt", f"configs/adapt-{task}-coco.yaml", "--set", f"backbone={vit_backbone_dir}",
            "--set", f"data.source={imported_coco}", "--set", f"out_dir={out}",
            "--set", "data.size=64", "--set", "data.max_train=3", "--set", "data.max_val=2",
            "--set", "train.steps=2", "--set", "train.batch_size=2", "--set", "decoder.dim=32",
            "--set", "decoder.num_queries=5", "--set", "decoder.layers=1",
            "--set", "data.holdout_classes=[person]",
        ])  # fmt: skip
        assert rc == 0
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["num_images"] == 2 and metrics["num_train_images"] == 3
        key = "semseg/mIoU_adapted" if task == "semseg" else "panoptic/PQ"
        assert key in metrics
        assert 0 < metrics["params/trainable"] < metrics["params/total"]
        weights = load_file(str(out / "adapted" / ADAPTED_WEIGHTS))
        assert all(
            k.startswith("decoder.") or is_adapter_param(k) or k == "class_emb" for k in weights
        )
        assert (
            sum(v.numel() for k, v in weights.items() if k != "class_emb")
            == metrics["params/trainable"]
        )
        # Reload reproduces the decoder output exactly.
        model = load_adapted(out / "adapted")
        assert model.vocab.holdout == ["person"]
    x = torch.randn(1, 3, 64, 64)
    a, b = load_adapted(out / "adapted"), load_adapted(out / "adapted")
    with torch.no_grad():
        assert torch.equal(a(x)["pred_masks"], b(x)["pred_masks"])
    assert callable(adapt)


# ------------------------------------------------------------------ panoptic: overfit, predict, eval


def _train_items(shards, model, n: int):
    from umgclip.adapt.data import load_items

    pre = model.backbone.preprocess_cfg
    items = load_items(shards, "train", model.vocab, model.cfg.data.size, pre.mean, pre.std)
    return sorted(items, key=lambda it: (len(it.labels), it.key))[:n]


@pytest.mark.slow
def test_panoptic_overfits_real_training_images(imported_coco, vit_backbone_dir):
    # Issue #7: PQ was 0.0 in every run (mask logits saturated -> empty masks). A decoder that
    # works must be able to memorise a few real images: PQ on them well above 0.
    from umgclip.adapt.evaluate import evaluate_adapted
    from umgclip.adapt.train import train_steps

    torch.manual_seed(0)
    model = _adapted(vit_backbone_dir, "panoptic", num_queries=20)
    items = _train_items(imported_coco, model, 3)
    tc = model.cfg.train
    tc.steps, tc.batch_size, tc.lr, tc.warmup = 150, 3, 2e-3, 10
    losses = train_steps(model, items, model.cfg)
    assert losses[-1] < 0.25 * losses[0]
    model.cfg.inference.open_vocab = False
    m = evaluate_adapted(model, items, batch_size=3)
    assert m["panoptic/PQ_invocab"] > 5.0, m
    assert m["panoptic/RQ"] > 10.0 and m["panoptic/SQ"] > 0.0, m


def test_pixel_decoder_mask_logits_start_unsaturated():
    # The root cause of issue #7: umg-lite's CNN features have std ~8; without normalisation in
    # the pixel decoder the initial mask logits had std ~8 too (sigmoids saturated at 0, no dice
    # gradient, every mask collapsed to empty, PQ 0.0).
    from umgclip.model.decoders.panoptic import PanopticDecoder

    torch.manual_seed(0)
    dec = PanopticDecoder([24, 40, 112], embed_dim=32, dim=64, num_queries=10, layers=1)
    feats = [8.0 * torch.randn(2, c, 32 // 2**i, 32 // 2**i) for i, c in enumerate([24, 40, 112])]
    with torch.no_grad():
        masks = dec(feats, F.normalize(torch.randn(5, 32), dim=-1))["pred_masks"]
    assert masks.shape == (2, 10, 32, 32)
    assert (masks.abs() > 6).float().mean() < 0.05
    assert masks.std() < 3.0


@pytest.fixture(scope="module")
def adapted_runs(vit_backbone_dir, tmp_path_factory):
    """Saved (untrained) semseg and panoptic adapted checkpoints. The panoptic one keeps every
    non-void query (thresholds 0) so that predictions are never empty."""
    root = tmp_path_factory.mktemp("adapted")
    runs = {}
    for task in ("semseg", "panoptic"):
        torch.manual_seed(0)
        model = _adapted(vit_backbone_dir, task)
        model.cfg.inference.object_threshold = 0.0
        model.cfg.inference.overlap_threshold = 0.0
        model.save(root / task / "adapted", vit_backbone_dir)
        runs[task] = root / task
    return runs


def _real_image(coco_root, tmp_path):
    from PIL import Image

    src = sorted((coco_root / "images").rglob("*.jpg"))[0]
    dst = tmp_path / "img.jpg"
    Image.open(src).convert("RGB").resize((96, 72)).save(dst)
    return dst


def test_predict_panoptic_cli_png_legend_and_json_match_ids(adapted_runs, coco_root, tmp_path):
    import numpy as np
    from matplotlib import colormaps
    from PIL import Image

    from umgclip.adapt.data import ClassVocab
    from umgclip.cli import main

    img = _real_image(coco_root, tmp_path)
    out = tmp_path / "pan.png"
    rc = main(["predict", str(adapted_runs["panoptic"]), str(img), "--task", "panoptic",
               "--out", str(out)])  # fmt: skip
    assert rc == 0 and out.is_file()
    result = json.loads(out.with_suffix(".json").read_text())
    ids = np.asarray(Image.open(out.with_name("pan_ids.png")))
    assert ids.shape == (72, 96)  # the original image size
    segs = result["segments"]
    assert segs, "thresholds 0 must keep at least one segment"
    # JSON segments <-> drawn id map: same ids, same areas, names from the vocabulary.
    assert {s["id"] for s in segs} == set(np.unique(ids).tolist()) - {0}
    names = ClassVocab.coco_panoptic().names
    for s in segs:
        assert s["area"] == int((ids == s["id"]).sum())
        assert s["name"] == names[s["category"]]
    # The legend: each segment's pure tab20 swatch is in the PNG (the overlay only has blends).
    png = np.asarray(Image.open(out).convert("RGB")).reshape(-1, 3).astype(int)
    cmap = colormaps["tab20"]
    for i in range(len(segs)):
        c = np.round(np.array(cmap(i % 20)[:3]) * 255).astype(int)
        assert (np.abs(png - c).max(1) <= 1).any(), f"legend swatch {i} missing"


def test_draw_panoptic_without_segments_has_no_legend(tmp_path):
    import numpy as np
    from PIL import Image

    from umgclip.adapt.panoptic_inference import PanopticPrediction, draw_panoptic

    image = Image.new("RGB", (80, 60), (40, 90, 160))
    seg = np.zeros((60, 80), dtype=np.int64)
    seg[10:30, 10:50] = 1
    one = PanopticPrediction(seg, [{"id": 1, "category": 0, "name": "person", "score": 0.9,
                                    "isthing": True, "area": 800}])  # fmt: skip
    a = draw_panoptic(image, one, tmp_path / "a.png")
    b = draw_panoptic(image, PanopticPrediction(np.zeros_like(seg), []), tmp_path / "b.png")
    # The legend sits right of the image: the figure with one segment is wider.
    assert Image.open(a).width > Image.open(b).width


def test_eval_cli_adapted_merges_keys(adapted_runs, imported_coco, vit_backbone_dir, tmp_path):
    from umgclip.adapt.evaluate import evaluate_adapted_run
    from umgclip.cli import main

    out = tmp_path / "m.json"
    rc = main(["eval", str(vit_backbone_dir), "--data", str(imported_coco), "--groups", "semseg",
               "--max-images", "4", "--precision", "fp32", "--out", str(out), "--adapted",
               str(adapted_runs["semseg"]), str(adapted_runs["panoptic"])])  # fmt: skip
    assert rc == 0
    m = json.loads(out.read_text())
    for k in ("semseg/mIoU_adapted", "panoptic/PQ", "panoptic/SQ", "panoptic/RQ"):
        assert k in m and 0.0 <= m[k] <= 100.0, k
    assert "semseg/mIoU" in m  # the backbone's own zero-shot group is still there
    assert m["panoptic/num_images_adapted"] == 4
    # Independent path: the same run evaluated directly gives the same numbers.
    direct = evaluate_adapted_run(
        adapted_runs["panoptic"], imported_coco, "val", precision="fp32", max_images=4
    )
    for k in ("panoptic/PQ", "panoptic/SQ", "panoptic/RQ"):
        assert m[k] == pytest.approx(direct[k], abs=1e-6)
    with pytest.raises(SystemExit, match="repeats metrics"):
        main(["eval", str(vit_backbone_dir), "--data", str(imported_coco), "--groups", "semseg",
              "--max-images", "2", "--adapted", str(adapted_runs["panoptic"]),
              str(adapted_runs["panoptic"])])  # fmt: skip
