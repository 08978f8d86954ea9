"""Loss values against hand computations, and CASES C10-C13, C16 for the losses."""

from __future__ import annotations

import gc
import logging
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from umgclip.losses import (
    LossConfig,
    LossTargets,
    UMGLoss,
    contrastive_loss,
    equality_targets,
    multilabel_loss,
)


def _unit(n: int, d: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=-1)


def _np_logsoftmax(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=1, keepdims=True))


def _hand_contrastive(a: np.ndarray, b: np.ndarray, keys: list[str], s: float) -> float:
    """Loops, no torch: mean over i of -(1/|P_i|) sum_{j in P_i} log p_ij, both directions."""
    logits = s * a @ b.T
    total = 0.0
    for lg in (logits, logits.T):
        ls = _np_logsoftmax(lg)
        for i in range(len(keys)):
            pos = [j for j in range(len(keys)) if keys[j] == keys[i]]
            total += -sum(ls[i, j] for j in pos) / len(pos) / len(keys)
    return total / 2


def test_itc_without_duplicates_equals_clip_cross_entropy():
    a, b = _unit(5, seed=1), _unit(5, seed=2)
    s = torch.tensor(14.0)
    got = contrastive_loss(a, b, ["0", "1", "2", "3", "4"], s)
    logits = s * a @ b.t()
    want = 0.5 * (
        F.cross_entropy(logits, torch.arange(5)) + F.cross_entropy(logits.t(), torch.arange(5))
    )
    assert torch.allclose(got, want, atol=1e-6)


def test_c11_duplicate_captions_are_positives():
    a, b = _unit(4, seed=3), _unit(4, seed=4)
    # Rows 0 and 2 carry the same caption: both are positives of each other, not negatives.
    keys = ["a dog", "a cat", "a dog", "a bird"]
    got = contrastive_loss(a, b, keys, torch.tensor(10.0)).item()
    want = _hand_contrastive(a.numpy(), b.numpy(), keys, 10.0)
    assert got == pytest.approx(want, abs=1e-5)
    # And it differs from treating the duplicate as a negative (the naive CLIP loss).
    naive = contrastive_loss(a, b, ["0", "1", "2", "3"], torch.tensor(10.0)).item()
    assert abs(got - naive) > 1e-3


def test_c11_identical_rows_duplicate_in_batch():
    # Duplicate ROWS (same image and caption twice): the loss equals a hand-worked 2-class value.
    e = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), dim=-1)
    s = 5.0
    got = contrastive_loss(e, e, ["x", "x", "y"], torch.tensor(s)).item()
    # Row 0 (and 1): logits [5, 5, 0], targets [.5, .5, 0]; row 2: logits [0, 0, 5], target one-hot.
    lse01 = math.log(2 * math.exp(5) + 1)
    row01 = -(0.5 * (5 - lse01) + 0.5 * (5 - lse01))
    row2 = -(5 - math.log(2 + math.exp(5)))
    want = (2 * row01 + row2) / 3  # the matrix is symmetric: both directions are equal
    assert got == pytest.approx(want, abs=1e-6)


def test_equality_targets_rows_sum_to_one():
    t = equality_targets(["a", "b", "a", "c", "a"], ["a", "b", "a", "c", "a"])
    assert torch.allclose(t.sum(1), torch.ones(5))
    assert t[0, 2] == pytest.approx(1 / 3) and t[1, 1] == 1.0 and t[0, 1] == 0.0


def test_multilabel_softmax_and_sigmoid_by_hand():
    emb = _unit(3, seed=5)
    vocab = ["person", "dog", "car"]
    vemb = _unit(3, seed=6)
    labels = [["person", "dog"], [], ["car", "unknown-not-in-vocab"]]
    s = 7.0
    got = multilabel_loss(emb, labels, vocab, vemb, torch.tensor(s), "softmax").item()
    logits = s * emb.numpy() @ vemb.numpy().T
    ls = _np_logsoftmax(logits)
    # Row 1 has no tag and is excluded; row 0 has two positives at 1/2 each.
    want = (-(0.5 * ls[0, 0] + 0.5 * ls[0, 1]) + -ls[2, 2]) / 2
    assert got == pytest.approx(want, abs=1e-5)

    got_sig = multilabel_loss(emb, labels, vocab, vemb, torch.tensor(s), "sigmoid", -2.0).item()
    y = np.array([[1, 1, 0], [0, 0, 1]], dtype=np.float64)
    z = logits[[0, 2]] - 2.0
    bce = -(y * np.log(1 / (1 + np.exp(-z))) + (1 - y) * np.log(1 - 1 / (1 + np.exp(-z))))
    assert got_sig == pytest.approx(bce.sum() / 2, abs=1e-4)


def _batch(b: int = 4, r: int = 6, seed: int = 0, d: int = 8):
    g = torch.Generator().manual_seed(seed)

    def u(n):
        return F.normalize(torch.randn(n, d, generator=g), dim=-1).requires_grad_(True)

    vocab = ["person", "dog", "car", "tree"]
    out = {
        "image": u(b),
        "text": u(b),
        "regions": u(r),
        "region_text": u(r),
        "tag_text": u(len(vocab)),
        "logit_scale": torch.tensor(10.0, requires_grad=True),
    }
    tg = LossTargets(
        captions=[f"cap {i % 3}" for i in range(b)],
        region_texts=["a photo of a person." if i % 2 else f"region {i}" for i in range(r)],
        tags=[["person"], ["dog", "person"], [], ["car"]][:b],
        region_tags=[["person"] if i % 2 else ["tree"] for i in range(r)],
        tag_vocab=vocab,
    )
    return out, tg


def test_umgloss_weights_and_terms():
    out, tg = _batch()
    res = UMGLoss()(out, tg)
    assert set(res) == {"loss", "itc", "rtc", "image_tag", "region_tag"}
    want = res["itc"] + res["rtc"] + 0.5 * (res["image_tag"] + res["region_tag"])
    assert torch.allclose(res["loss"], want)
    # Independent check of ITC inside the module.
    ref = contrastive_loss(out["image"], out["text"], tg.captions, torch.tensor(10.0))
    assert torch.allclose(res["itc"], ref)
    res["loss"].backward()
    assert all(out[k].grad is not None for k in ("image", "text", "regions", "tag_text"))

    only_itc = UMGLoss(LossConfig(rtc=0, image_tag=0, region_tag=0))(
        {"image": out["image"], "text": out["text"], "logit_scale": out["logit_scale"]}, tg
    )
    assert set(only_itc) == {"loss", "itc"}

    sig = UMGLoss(LossConfig(tag_loss="sigmoid"))(out, tg)
    assert torch.isfinite(sig["image_tag"]) and not torch.allclose(
        sig["image_tag"], res["image_tag"]
    )


def test_loss_config_rejects_bad_values():
    with pytest.raises(ValueError, match="tag_loss"):
        LossConfig(tag_loss="hinge")
    with pytest.raises(ValueError, match="itc"):
        LossConfig(itc=-1.0)


def test_c10_global_batch_of_one_skips_contrastive_explicitly(caplog):
    out, tg = _batch(b=1, r=1)
    tg.tags = [[]]
    tg.region_tags = [[]]
    with caplog.at_level(logging.WARNING, logger="umgclip.losses"):
        loss = UMGLoss()
        res = loss(out, tg)
    assert "itc" not in res and "rtc" not in res  # skipped, not a silent 0
    assert set(loss.last_skipped) == {"itc", "rtc", "image_tag", "region_tag"}
    assert "global batch of 1" in caplog.text
    # The total is still differentiable (every rank must run backward under DDP).
    res["loss"].backward()
    assert res["loss"].item() == 0.0 and out["image"].grad is not None


def test_c12_logit_scale_clamped_no_overflow_fp32_and_bf16():
    out, tg = _batch()
    huge = dict(out, logit_scale=torch.tensor(1e6))
    at100 = dict(out, logit_scale=torch.tensor(100.0))
    a = UMGLoss()(huge, tg)["loss"]
    b = UMGLoss()(at100, tg)["loss"]
    assert torch.isfinite(a) and torch.allclose(a, b)
    bf = {k: (v.detach().bfloat16() if v.ndim else v) for k, v in huge.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        c = UMGLoss()(bf, tg)
    assert all(torch.isfinite(v) for v in c.values())
    assert c["loss"].dtype == torch.float32  # logits computed in fp32 even under autocast
    assert c["loss"].item() == pytest.approx(b.item(), rel=0.05)


class _MicroClip(torch.nn.Module):
    """A stand-in CLIP: linear image and text towers over fixed features."""

    def __init__(self, d_in: int = 16, d: int = 8) -> None:
        super().__init__()
        self.image_tower = torch.nn.Sequential(torch.nn.Linear(d_in, 32), torch.nn.GELU())
        self.image_proj = torch.nn.Linear(32, d)
        self.text_tower = torch.nn.Embedding(64, d)
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        img = F.normalize(self.image_proj(self.image_tower(x)), dim=-1)
        txt = F.normalize(self.text_tower(ids), dim=-1)
        return {
            "image": img,
            "text": txt,
            "logit_scale": self.logit_scale.exp().clamp(max=100),
        }


def _micro_step(model, opt, x, ids, captions):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, ids)
        res = UMGLoss(LossConfig(rtc=0, image_tag=0, region_tag=0))(
            out, LossTargets(captions=captions)
        )
    opt.zero_grad(set_to_none=True)
    res["loss"].backward()
    opt.step()
    return res["loss"].detach()


def test_c13_bf16_autocast_keeps_fp32_master_weights_and_finite_loss():
    torch.manual_seed(0)
    model = _MicroClip()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    x, ids = torch.randn(8, 16), torch.arange(8)
    caps = [str(i) for i in range(8)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    l0 = _micro_step(model, opt, x, ids, caps)
    l1 = _micro_step(model, opt, x, ids, caps)
    assert torch.isfinite(l0) and torch.isfinite(l1)
    for k, v in model.state_dict().items():
        assert v.dtype == torch.float32, k
        assert not torch.equal(v, before[k]), f"{k} did not update"
    assert all(s["exp_avg"].dtype == torch.float32 for s in opt.state.values())


def _tensor_bytes() -> int:
    total = 0
    with warnings.catch_warnings():  # isinstance() pokes deprecated proxies in gc's list
        warnings.simplefilter("ignore")
        objs = gc.get_objects()
        tensors = [o for o in objs if isinstance(o, torch.Tensor)]
    for o in tensors:
        try:
            if not o.is_meta:
                total += o.untyped_storage().nbytes()
        except Exception:  # objects mid-construction or without storage
            continue
    return total


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_c16_memory_steady_after_step_two():
    torch.manual_seed(0)
    model = _MicroClip(d_in=256, d=64)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    x, ids = torch.randn(32, 256), torch.arange(32)
    caps = [str(i % 20) for i in range(32)]
    tracked, rss, losses = [], [], []
    for _ in range(12):
        losses.append(_micro_step(model, opt, x, ids, caps).item())  # .item(): keep no graph
        gc.collect()
        tracked.append(_tensor_bytes())
        rss.append(_rss_bytes())
    # Live tensor bytes are identical from step 3 on: nothing accumulates (graphs, histories).
    assert len(set(tracked[2:])) == 1, tracked
    # RSS may wobble with the allocator, but does not grow step over step.
    assert rss[-1] - rss[2] < 8 * 2**20, [r // 2**20 for r in rss]
    assert losses[-1] < losses[0]
