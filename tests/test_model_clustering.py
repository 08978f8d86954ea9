"""Cluster-based token reduction (DESIGN 1.3) on tiny random ViTs."""

from __future__ import annotations

import pytest
import torch
from open_clip.transformer import ResidualAttentionBlock
from torch.utils.flop_counter import FlopCounterMode

import umgclip
from umgclip.model.token_clustering import (
    cluster_tokens,
    dpc_knn_assign,
    proportional_attention_mask,
    unfold_tokens,
)


def _tiny(overrides: list[str] | None = None):
    torch.manual_seed(0)
    return umgclip.create_model("umg-vit-tiny", overrides=overrides)


def test_keep_all_equals_plain_vit():
    model = _tiny(["clustering.keep=1.0"])
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        model.set_token_clustering(False)
        ref_img, ref_dense = model.encode_image(x), model.encode_dense(x)
        model.set_token_clustering(True)
        img, dense = model.encode_image(x), model.encode_dense(x)
    torch.testing.assert_close(img, ref_img, atol=1e-5, rtol=0)
    torch.testing.assert_close(dense, ref_dense, atol=1e-5, rtol=0)


def test_every_patch_in_exactly_one_contiguous_cluster():
    torch.manual_seed(0)
    b, gh, gw, c, window = 2, 8, 8, 16, 4
    x = torch.randn(b, gh * gw, c)
    merged, cl = cluster_tokens(x, (gh, gw), keep=0.25, k=5, window=window)
    m = (gh // window) * (gw // window) * round(0.25 * window * window)
    assert merged.shape == (b, m, c) and cl.sizes.shape == (b, m)
    assert cl.assign.shape == (b, gh * gw)
    assert ((cl.assign >= 0) & (cl.assign < m)).all()
    for i in range(b):
        counts = torch.bincount(cl.assign[i], minlength=m).float()
        assert torch.equal(counts, cl.sizes[i])  # sizes agree with the assignment
        assert (counts >= 1).all() and counts.sum() == gh * gw  # partition, no empty cluster
        # Clusters never cross local windows (spatially contiguous regions).
        rows = torch.arange(gh * gw) // gw
        cols = torch.arange(gh * gw) % gw
        win = (rows // window) * (gw // window) + cols // window
        for j in range(m):
            assert win[cl.assign[i] == j].unique().numel() == 1
            # The merged token is the mean of its members.
            torch.testing.assert_close(merged[i, j], x[i, cl.assign[i] == j].mean(0))


def test_dpc_knn_separates_two_obvious_groups():
    torch.manual_seed(0)
    u, v = torch.randn(8), torch.randn(8) * 5 + 10
    pts = torch.cat([u + 0.01 * torch.randn(6, 8), v + 0.01 * torch.randn(10, 8)])
    perm = torch.randperm(16)
    assign = dpc_knn_assign(pts[perm][None], num_centres=2, k=3)[0]
    group = (perm >= 6).long()
    # Same partition as the groups (cluster ids may be either way round).
    assert assign.unique().numel() == 2
    for g in (0, 1):
        assert assign[group == g].unique().numel() == 1


def test_unfold_restores_full_grid():
    model = _tiny()
    model.train()  # clustering is on in training for this config
    assert model.image_tower.cluster_enabled
    x = torch.randn(2, 3, 64, 64)
    out = model.encode_dense(x)
    assert out.shape == (2, 64, 8, 8)
    tokens = torch.randn(2, 5, 3)
    from umgclip.model.token_clustering import Clusters

    cl = Clusters(assign=torch.tensor([[0, 4, 4, 1], [2, 2, 3, 0]]), sizes=torch.ones(2, 5))
    unf = unfold_tokens(tokens, cl)
    assert unf.shape == (2, 4, 3)
    assert torch.equal(unf[0, 1], tokens[0, 4]) and torch.equal(unf[1, 2], tokens[1, 3])


def test_mode_defaults_and_override():
    model = _tiny()
    model.train()
    assert model.image_tower.cluster_enabled  # on in pre-training
    model.eval()
    assert not model.image_tower.cluster_enabled  # off in eval
    model.set_token_clustering(True)
    assert model.image_tower.cluster_enabled
    model.train().eval()
    assert model.image_tower.cluster_enabled  # override survives mode switches
    model.set_token_clustering(None)
    assert not model.image_tower.cluster_enabled


def test_proportional_attention_equals_duplicated_tokens():
    """A cluster of n identical tokens with log(n) added to its logits attends exactly like the
    n separate tokens: the independent check that the bias is right."""
    torch.manual_seed(0)
    blk = ResidualAttentionBlock(16, 2).eval()
    cls, a, b, c = torch.randn(4, 1, 16).unbind(0)
    full = torch.stack([cls, a, a, a, b, c], dim=1)  # (1, 6, 16)
    short = torch.stack([cls, a, b, c], dim=1)
    mask = proportional_attention_mask(torch.tensor([[3.0, 1.0, 1.0]]), num_heads=2)
    with torch.no_grad():
        ref = blk(full)
        got = blk(short, attn_mask=mask)
    torch.testing.assert_close(got[:, [0, 1, 2, 3]], ref[:, [0, 1, 4, 5]], atol=1e-5, rtol=0)
    with torch.no_grad():
        plain = blk(short)
    assert not torch.allclose(plain[:, 0], ref[:, 0], atol=1e-4)


def _block_flops(model, x, start: int) -> int:
    # With grad enabled: under no_grad nn.MultiheadAttention takes its native fast path, whose
    # attention FLOPs the counter does not see, which would make the two runs incomparable.
    with FlopCounterMode(display=False) as fc:
        model.image_tower(x)
    counts = fc.get_flop_counts()
    total = 0
    for name, per_op in counts.items():
        tail = name.rsplit("resblocks.", 1)
        if len(tail) == 2 and tail[1].isdigit() and int(tail[1]) >= start:
            total += sum(per_op.values())
    return total


def test_flops_after_clustering_fall_about_4x():
    model = _tiny(["image.open_clip.layers=4", "clustering.cluster_after=2"])
    x = torch.randn(2, 3, 64, 64)
    model.set_token_clustering(False)
    full = _block_flops(model, x, start=2)
    model.set_token_clustering(True)
    reduced = _block_flops(model, x, start=2)
    assert full > 0 and reduced > 0
    # 1+64 tokens -> 1+16: linear parts fall 65/17 = 3.8x, attention more.
    assert 3.5 < full / reduced < 4.5


def test_bad_window_is_clear_error():
    model = _tiny(["clustering.window=3"])
    model.set_token_clustering(True)
    with pytest.raises(ValueError, match="window 3 does not divide"):
        model.encode_image(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="cluster_after"):
        _tiny(["clustering.cluster_after=2"])
