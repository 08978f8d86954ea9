"""open_clip ViT towers on the tiny random config: open_clip parity, tokenizer cases, checkpoints,
precision (C06, C07, C08, C09, C12, C24)."""

from __future__ import annotations

import json
import math

import open_clip
import pytest
import torch

import umgclip
from umgclip.model.io import CheckpointError
from umgclip.model.registry import build_model, get_model_config
from umgclip.model.tokenizer import CLIPBPETokenizer
from umgclip.model.umgclip import UMGCLIP

TINY = "umg-vit-tiny"


def _tiny(seed: int = 0, overrides: list[str] | None = None) -> UMGCLIP:
    torch.manual_seed(seed)
    return umgclip.create_model(TINY, overrides=overrides)


def _open_clip_tiny(quick_gelu: bool = True) -> torch.nn.Module:
    cfg = get_model_config(TINY)
    torch.manual_seed(1)
    return open_clip.model.CLIP(
        embed_dim=cfg.embed_dim,
        vision_cfg=cfg.image.open_clip,
        text_cfg=cfg.text.open_clip,
        quick_gelu=quick_gelu,
    ).eval()


def test_api_shapes_and_normalised():
    model = _tiny()
    tok = umgclip.get_tokenizer(TINY)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        img = model.encode_image(x)
        txt = model.encode_text(tok(["a dog", "two cats"]))
        dense = model.encode_dense(x)
        ms = model.image_tower.forward_multiscale(x)
    assert img.shape == (2, 64) and txt.shape == (2, 64)
    assert dense.shape == (2, 64, 8, 8)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(dense.norm(dim=1), torch.ones(2, 8, 8))
    assert [m.shape[-1] for m in ms] == sorted(m.shape[-1] for m in ms)
    assert all(m.shape[1] == 64 for m in ms)
    names = [n for n, _ in model.named_parameters()]
    assert all(n.startswith(("image_tower.", "text_tower.", "logit_scale")) for n in names)


def test_open_clip_checkpoint_matches_open_clip_forward(tmp_path):
    """An open_clip model saved in open_clip's own format loads into our towers and gives the
    same embeddings as open_clip's forward."""
    ref = _open_clip_tiny()
    path = tmp_path / "open_clip_tiny.pt"
    torch.save(ref.state_dict(), path)
    ours = umgclip.create_model(TINY, pretrained=str(path))
    x = torch.randn(3, 3, 64, 64)
    tok = open_clip.get_tokenizer("ViT-B-16", context_length=32)
    ids = tok(["a photo of a dog", "", "a much longer caption about a cat sitting on a mat"])
    with torch.no_grad():
        torch.testing.assert_close(
            ours.encode_image(x), ref.encode_image(x, normalize=True), atol=1e-5, rtol=0
        )
        torch.testing.assert_close(
            ours.encode_text(ids), ref.encode_text(ids, normalize=True), atol=1e-5, rtol=0
        )
    assert math.isclose(ours.logit_scale.item(), ref.logit_scale.item())
    # Our tokenizer gives open_clip's ids.
    assert torch.equal(ours.tokenizer(["a photo of a dog"]), tok(["a photo of a dog"]))


def test_open_clip_checkpoint_wrong_size_is_clear_error(tmp_path):
    cfg = get_model_config(TINY)
    vc = dict(cfg.image.open_clip, width=32, head_width=16)
    ref = open_clip.model.CLIP(cfg.embed_dim, vc, cfg.text.open_clip, quick_gelu=True)
    path = tmp_path / "other.pt"
    torch.save({"state_dict": ref.state_dict()}, path)
    with pytest.raises(CheckpointError, match="does not fit"):
        umgclip.create_model(TINY, pretrained=str(path))


def test_c24_reload_bit_exact_and_config_from_checkpoint(tmp_path):
    model = _tiny(overrides=["preprocess.size=64", "preprocess.interpolation=bilinear"])
    model.save_pretrained(tmp_path / "m")
    stored = json.loads((tmp_path / "m" / "config.json").read_text())["model"]
    assert stored["quick_gelu"] is True and stored["preprocess"]["interpolation"] == "bilinear"
    assert stored["tokenizer"]["context_length"] == 32
    assert stored["image"]["open_clip"]["width"] == 64
    loaded = umgclip.load_model(tmp_path / "m")
    assert loaded.preprocess_cfg.interpolation == "bilinear"
    x = torch.randn(2, 3, 64, 64)
    ids = loaded.tokenizer(["a red car", "a dog's bone\nwith 🎉"])
    boxes = [torch.tensor([[0.0, 0.0, 30.0, 40.0]]), torch.tensor([[8.0, 8.0, 60.0, 60.0]])]
    with torch.no_grad():
        assert torch.equal(model.encode_image(x), loaded.encode_image(x))
        assert torch.equal(model.encode_text(ids), loaded.encode_text(ids))
        a, b = model.encode_boxes(x, boxes), loaded.encode_boxes(x, boxes)
        assert all(torch.equal(p, q) for p, q in zip(a, b))
    # Loading through the folder name alone works too.
    again = umgclip.create_model(str(tmp_path / "m"))
    with torch.no_grad():
        assert torch.equal(model.encode_image(x), again.encode_image(x))


def test_c24_activation_matters_and_mismatch_is_error(tmp_path):
    model = _tiny()
    model.save_pretrained(tmp_path / "m")
    gelu_cfg = get_model_config(TINY, ["quick_gelu=false"])
    # The activation really changes outputs, so it must come from the checkpoint ...
    gelu = build_model(gelu_cfg)
    gelu.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert not torch.allclose(gelu.eval().encode_image(x), model.encode_image(x))
    # ... and a config that disagrees with the checkpoint is an error, not a silent change.
    with pytest.raises(CheckpointError, match="quick_gelu"):
        umgclip.load_model(tmp_path / "m", config=gelu_cfg)
    with pytest.raises(CheckpointError, match="preprocess.size"):
        umgclip.create_model(TINY, pretrained=tmp_path / "m", overrides=["preprocess.size=32"])


def test_c08_context_length_mismatch_rejected_at_construction():
    cfg = get_model_config(TINY)
    model = build_model(cfg)
    with pytest.raises(ValueError, match="context_length 77 does not match"):
        UMGCLIP(cfg, model.image_tower, model.text_tower, CLIPBPETokenizer(77))
    with pytest.raises(ValueError, match="differs"):
        umgclip.get_tokenizer(TINY, context_length=77)
    with pytest.raises(ValueError, match="context length is 32"):
        model.encode_text(CLIPBPETokenizer(77)(["a dog"]))


def test_c06_overlong_and_digit_heavy_truncated_with_eot_last():
    tok = umgclip.get_tokenizer(TINY)
    digits = " ".join(str(1234567 + i) for i in range(40))  # few words, many tokens
    ids = tok(["word " * 200, digits])
    assert ids.shape == (2, 32)
    assert (ids[:, -1] == tok.eot_token_id).all()
    assert ((ids == tok.eot_token_id).sum(1) == 1).all()
    strict = CLIPBPETokenizer(32, truncate=False)
    n_tokens = len(strict._tok.encode(digits)) + 2
    with pytest.raises(ValueError, match=f"{n_tokens} tokens"):
        strict([digits])


def test_c07_empty_caption_is_start_end_only():
    tok = umgclip.get_tokenizer(TINY)
    ids = tok([""])[0]
    assert ids[0] == tok.sot_token_id and ids[1] == tok.eot_token_id
    assert (ids[2:] == 0).all()
    model = _tiny()
    with torch.no_grad():
        assert torch.isfinite(model.encode_text(ids[None])).all()


C09_TEXTS = [
    "dog",
    "word " * 100,
    "Ünïcödé café naïve",
    "a cat 🐱🎉 with emoji",
    "一只猫坐在垫子上",
    "it's the dog's bone, isn't it?",
    "line one\nline two\r\n\tline three",
    "",
]


def test_c09_exactly_one_eot_at_pooled_position():
    model = _tiny()
    ids = model.tokenizer(C09_TEXTS)
    eot = model.tokenizer.eot_token_id
    assert ((ids == eot).sum(1) == 1).all()
    # open_clip pools at argmax(ids): that must be the EOT position for every row.
    assert torch.equal(ids.argmax(-1), (ids == eot).int().argmax(-1))


def test_c12_logit_scale_clamped_fp32_and_bf16():
    model = _tiny()
    assert math.isclose(model.logit_scale.item(), math.log(1 / 0.07), rel_tol=1e-6)
    with torch.no_grad():
        model.logit_scale.fill_(20.0)  # exp(20) would overflow any sane logit
    assert model.logit_scale_value().item() == 100.0
    x = torch.randn(4, 3, 64, 64)
    ids = model.tokenizer(["a", "b", "c", "d"])
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(x, ids)
            logits = out["logit_scale"] * out["image"] @ out["text"].T
        assert out["logit_scale"].item() == 100.0
        assert torch.isfinite(logits).all() and logits.abs().max() <= 100.5
    model.clamp_logit_scale_()
    assert math.isclose(model.logit_scale.item(), math.log(100), rel_tol=1e-6)


@pytest.mark.parametrize("clustering", [False, True])
@pytest.mark.parametrize("bf16", [False, True])
def test_precision_forward_backward(bf16, clustering):
    model = _tiny().train()
    model.set_token_clustering(clustering)
    x = torch.randn(4, 3, 64, 64)
    boxes = [torch.tensor([[0.0, 0.0, 32.0, 32.0], [10.0, 5.0, 60.0, 50.0]])] * 4
    ids = model.tokenizer(["a", "b", "c", "d"])
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = model.forward_train(x, boxes)
        txt = model.encode_text(ids)
        dense = model.encode_dense(x)
        logits = model.logit_scale_value() * out["image"] @ txt.T
        loss = torch.nn.functional.cross_entropy(logits.float(), torch.arange(4))
        loss = loss + out["regions"].float().sum() * 1e-3 + dense.float().mean()
    loss.backward()
    assert out["regions"].shape == (8, 64) and torch.isfinite(loss)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.image_tower.visual.conv1.weight.grad.abs().sum() > 0
    assert model.logit_scale.grad is not None


def test_bf16_model_copy_inference_close_to_fp32():
    model = _tiny()
    x = torch.randn(2, 3, 64, 64)
    ids = model.tokenizer(["a dog", "a cat"])
    with torch.no_grad():
        ref_i, ref_t = model.encode_image(x), model.encode_text(ids)
        half = _tiny().to(torch.bfloat16)
        got_i, got_t = half.encode_image(x), half.encode_text(ids)
    assert got_i.dtype == torch.bfloat16
    assert (got_i.float() * ref_i).sum(-1).min() > 0.98
    assert (got_t.float() * ref_t).sum(-1).min() > 0.98


def test_wrong_image_size_is_clear_error():
    model = _tiny()
    with pytest.raises(ValueError, match="64x64"):
        model.encode_image(torch.randn(1, 3, 96, 96))
    with pytest.raises(ValueError, match=r"\(B,3,H,W\)"):
        model.encode_image(torch.randn(3, 64, 64))


def test_registry_and_tokenizer_from_folder(tmp_path):
    assert {"umg-lite", "umg-vit-b16", "umg-vit-l14", "umg-vit-tiny"} <= set(umgclip.list_models())
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        umgclip.create_model("nope")
    with pytest.raises(CheckpointError, match="neither"):
        umgclip.create_model(TINY, pretrained=tmp_path / "missing.pt")
    _tiny().save_pretrained(tmp_path / "m")
    tok = umgclip.get_tokenizer(str(tmp_path / "m"))
    assert tok.context_length == 32 and tok(["a"]).shape == (1, 32)


@pytest.mark.parametrize("mode", ["shortest", "longest", "squash"])
def test_preprocess_modes(mode):
    import dataclasses

    import numpy as np
    from PIL import Image

    from umgclip.model.preprocess import build_preprocess

    pre_cfg = dataclasses.replace(get_model_config(TINY).preprocess, resize_mode=mode)
    pre = build_preprocess(pre_cfg)
    rgba = Image.fromarray(np.full((50, 100, 4), 200, np.uint8), "RGBA")  # wide, with alpha
    out = pre(rgba)
    assert out.shape == (3, 64, 64) and out.dtype == torch.float32
    mean, std = torch.tensor(pre_cfg.mean), torch.tensor(pre_cfg.std)
    value = (200 / 255 - mean) / std
    if mode == "longest":
        # Resized to 64x32 at the top; the padding below holds the normalised fill (0).
        torch.testing.assert_close(out[:, :32].mean((1, 2)), value, atol=1e-3, rtol=0)
        torch.testing.assert_close(out[:, 33:].mean((1, 2)), -mean / std, atol=1e-5, rtol=0)
    else:
        torch.testing.assert_close(out.mean((1, 2)), value, atol=1e-3, rtol=0)
