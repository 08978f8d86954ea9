"""Auto-annotation: filters on hand-made boxes/masks, the pipeline on awkward images (C01, C02,
C04), resumption after a kill, the Ray executor, and OWLv2 coordinates on non-square images
(C20)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from umgclip.annotate.config import AnnotateConfig, AnnotatorSpec, FilterConfig
from umgclip.annotate.evaluate import read_samples
from umgclip.annotate.filters import clip_boxes, filter_boxes, filter_masks

NO_RULES = FilterConfig(
    min_box_score=None, min_area_frac=None, max_area_frac=None, min_side=None,
    max_aspect=None, nms_iou=None, min_mask_area_frac=None, min_mask_fill=None, max_regions=None,
)  # fmt: skip


def test_c17_clip_boxes_rule() -> None:
    boxes = np.array([[-5, -5, 10, 10], [5, 5, 5, 9], [np.nan, 0, 3, 3], [200, 0, 300, 5]])
    out, valid = clip_boxes(boxes, 100, 50)
    assert valid.tolist() == [True, False, False, False]
    assert out[0].tolist() == [0, 0, 10, 10]


def test_filter_boxes_each_rule_counted() -> None:
    W, H = 100, 100
    boxes = np.array(
        [
            [0, 0, 50, 50],  # kept (best)
            [1, 1, 51, 51],  # duplicate of 0 (IoU ~0.92)
            [0, 0, 2, 2],  # min_area (4 px = 0.0004)
            [0, 0, 99, 3],  # max_aspect 33 (min_side 3 would also fail; charged to first rule)
            [60, 60, 90, 90],  # low score
            [np.inf, 0, 1, 1],  # invalid
            [0, 0, 100, 100],  # max_area
            [55, 0, 95, 40],  # kept, capped by max_regions=1? no: cap=2 keeps it
        ],
        dtype=np.float32,
    )
    scores = np.array([0.9, 0.8, 0.9, 0.9, 0.1, 0.9, 0.9, 0.7])
    cfg = FilterConfig(
        min_box_score=0.5, min_area_frac=0.01, max_area_frac=0.95, min_side=5, max_aspect=8,
        nms_iou=0.7, max_regions=2,
    )  # fmt: skip
    counts: Counter = Counter()
    keep, _ = filter_boxes(boxes, scores, W, H, cfg, counts)
    assert keep.tolist() == [0, 7]
    assert counts == Counter(
        {
            "invalid_box": 1,
            "box_score": 1,
            "min_area": 1,
            "max_area": 1,
            "min_side": 1,
            "duplicate": 1,
        }
    )
    # Every dropped box is charged to exactly one rule.
    assert sum(counts.values()) + len(keep) == len(boxes)
    counts2: Counter = Counter()
    keep2, _ = filter_boxes(
        boxes, scores, W, H, FilterConfig(**{**NO_RULES.__dict__, "max_regions": 3}), counts2
    )
    assert len(keep2) == 3 and counts2["max_regions"] == 4 and counts2["invalid_box"] == 1
    assert scores[keep2].tolist() == sorted(scores[keep2].tolist(), reverse=True)


def test_filter_masks_area_and_fill() -> None:
    H = W = 20
    m = np.zeros((4, H, W), bool)
    m[1, 0:10, 0:10] = True  # fills its 10x10 box fully
    m[2, 0:2, 0:2] = True  # fills 4 / 100 of its box
    m[3, 0, 0] = True  # 1 px: below min area
    boxes = np.array([[0, 0, 10, 10]] * 4, np.float32)
    counts: Counter = Counter()
    keep = filter_masks(
        m, boxes, W, H, FilterConfig(min_mask_area_frac=0.005, min_mask_fill=0.2), counts
    )
    assert keep.tolist() == [1]
    assert counts == Counter({"mask_empty": 1, "mask_area": 1, "mask_fill": 1})
    assert filter_masks(np.zeros((0, H, W), bool), np.zeros((0, 4)), W, H, FilterConfig()).size == 0


def test_classical_proposals_and_masks_in_image_frame() -> None:
    from umgclip.annotate.backends.classical import SelectiveSearchProposer, SuperpixelMasker

    arr = np.full((90, 300, 3), 30, np.uint8)
    arr[20:70, 200:280] = (250, 40, 40)  # a red object on a dark background
    im = Image.fromarray(arr)
    det = SelectiveSearchProposer(max_side=150).detect([im])[0]
    assert det.boxes.shape[1] == 4 and len(det) > 0
    assert (det.boxes[:, 2] <= 300 + 1e-3).all() and (det.boxes[:, 3] <= 90 + 1e-3).all()
    # The object itself is proposed (up to the 2x working-resolution rounding).
    from torchvision.ops import box_iou

    best = box_iou(torch.tensor([[200.0, 20, 280, 70]]), torch.from_numpy(det.boxes)).max()
    assert best > 0.85
    # The mask of a box around the object (with background margin) is the object's pixels.
    mask = SuperpixelMasker(max_side=150).masks([im], [np.array([[190, 10, 290, 80]])])[0][0]
    truth = np.zeros((90, 300), bool)
    truth[20:70, 200:280] = True
    # All of the object, and well under the box: the smoothed edge halo may join (measured 0.71).
    assert (mask & truth).sum() / truth.sum() > 0.95
    assert (mask & truth).sum() / (mask | truth).sum() > 0.6
    assert mask.sum() < 0.85 * 100 * 70


# ----------------------------------------------------------------------------- pipeline
@pytest.fixture()
def image_dir(tmp_path: Path) -> Path:
    d = tmp_path / "imgs"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        arr = np.full((48 + 8 * i, 80, 3), 40, np.uint8)
        arr[10:40, 10 + 5 * i : 50 + 5 * i] = rng.integers(150, 255, 3)
        Image.fromarray(arr).save(d / f"img{i}.jpg")
    Image.new("RGBA", (60, 40), (0, 200, 0, 120)).save(d / "c01_rgba.png")
    Image.new("L", (40, 64), 100).save(d / "c02_gray.png")
    (d / "c04_corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    (d / "img0.txt").write_text("a caption from the input")
    return d


def _tiny_model_dir(tmp_path: Path) -> str:
    # Saved once and reloaded, so every run (and every Ray actor) has identical weights.
    d = tmp_path / "umg-tiny"
    if not d.is_dir():
        from umgclip import create_model

        torch.manual_seed(0)
        create_model("umg-vit-tiny").save_pretrained(d)
    return str(d)


def tiny_cfg(tmp_path: Path, **kw) -> AnnotateConfig:
    model = _tiny_model_dir(tmp_path)
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("red square\ngreen field\ngray wall\n")
    return AnnotateConfig(
        tagger=AnnotatorSpec(backend="umgclip", model=model, options={"topk": 2, "bf16": False}),
        detector=AnnotatorSpec(backend="classical", options={"max_side": 64}),
        region_labeller=AnnotatorSpec(backend="umgclip", model=model, options={"bf16": False}),
        masker=AnnotatorSpec(backend="classical", options={"max_side": 64}),
        vocabulary=str(vocab),
        min_tag_score=-1.0,
        filters=FilterConfig(min_box_score=None, min_mask_fill=None, max_regions=4),
        shard_size=3,
        batch_size=2,
        **kw,
    )


def _keys(out: Path) -> list[str]:
    from umgclip.data.shards import iter_raw_samples, list_shards

    return [r.key for r in iter_raw_samples(list_shards(out))]


def test_c01_c02_c04_pipeline_folder(image_dir: Path, tmp_path: Path) -> None:
    from umgclip.annotate.pipeline import annotate

    out = tmp_path / "out"
    summary = annotate(image_dir, out, tiny_cfg(tmp_path), progress=False)
    assert summary["images"] == 7 and summary["errors"] == 1
    assert summary["error_examples"][0]["key"] == "c04_corrupt"
    samples = read_samples(out)
    assert set(samples) == {"c01_rgba", "c02_gray", *(f"img{i}" for i in range(5))}
    s0 = samples["img0"]
    assert s0.captions[0] == "a caption from the input" and s0.caption_sources[0] == "input"
    gray = samples["c02_gray"]
    assert gray.caption_sources == ["composed"] and gray.captions[0].startswith("a photo of")
    assert len(gray.tags) == 2 and set(gray.tags) <= {"red square", "green field", "gray wall"}
    for s in samples.values():
        s.validate()
        for r in s.regions:
            assert (
                r.mask is not None
                and r.tags
                and r.score is not None
                and r.source.startswith("classical")
            )
    fc = summary["filter_counts"]
    assert fc["kept_regions"] == sum(len(s.regions) for s in samples.values())
    assert set(summary["annotators"]) == {"tagger", "detector", "region_labeller", "masker"}


def test_resume_after_kill_no_duplicates_no_loss(
    image_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    from umgclip.annotate import pipeline

    cfg = tiny_cfg(tmp_path)
    full = tmp_path / "full"
    pipeline.annotate(image_dir, full, cfg, progress=False)
    out = tmp_path / "killed"
    # Kill inside the second chunk: after its first batch of stages, before its shard is written.
    real = pipeline.LocalExecutor.run
    calls = {"n": 0}

    def dying(self, items):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated kill")
        return real(self, items)

    monkeypatch.setattr(pipeline.LocalExecutor, "run", dying)
    with pytest.raises(KeyboardInterrupt):
        pipeline.annotate(image_dir, out, cfg, progress=False)
    assert len(json.loads((out / "manifest.json").read_text())["chunks"]) == 1
    assert not list(out.glob("*.tmp"))
    monkeypatch.setattr(pipeline.LocalExecutor, "run", real)
    summary = pipeline.annotate(image_dir, out, cfg, progress=False)
    keys = _keys(out)
    assert len(keys) == len(set(keys)) == 7 and summary["images"] == 7
    assert {k: v.to_dict() for k, v in read_samples(out).items()} == {
        k: v.to_dict() for k, v in read_samples(full).items()
    }
    # A rerun of a finished job does nothing and changes nothing.
    pipeline.annotate(image_dir, out, cfg, progress=False)
    assert sorted(_keys(out)) == sorted(keys)


def test_resume_refuses_other_config(image_dir: Path, tmp_path: Path) -> None:
    from umgclip.annotate.pipeline import annotate

    out = tmp_path / "o"
    annotate(image_dir, out, tiny_cfg(tmp_path, limit=3), progress=False)
    cfg = tiny_cfg(tmp_path)
    cfg.filters.max_regions = 1
    with pytest.raises(RuntimeError, match="another config"):
        annotate(image_dir, out, cfg, progress=False)


@pytest.mark.slow
def test_ray_executor_matches_local(image_dir: Path, tmp_path: Path) -> None:
    ray = pytest.importorskip("ray")
    from umgclip.annotate.pipeline import annotate

    cfg = tiny_cfg(tmp_path)
    annotate(image_dir, tmp_path / "local", cfg, progress=False)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        cfg.ray.concurrency = 2
        annotate(image_dir, tmp_path / "ray", cfg, executor="ray", progress=False)
    finally:
        ray.shutdown()
    local, remote = read_samples(tmp_path / "local"), read_samples(tmp_path / "ray")
    assert len(local) == 7
    assert {k: v.to_dict() for k, v in remote.items()} == {k: v.to_dict() for k, v in local.items()}


# ----------------------------------------------------------------------------- C20 (OWLv2)
def _tiny_owlv2(d: Path) -> Path:
    from transformers import (
        CLIPTokenizer,
        Owlv2Config,
        Owlv2ForObjectDetection,
        Owlv2ImageProcessor,
        Owlv2Processor,
    )
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    V = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16)
    cfg = Owlv2Config(
        text_config=dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=V - 2,
                         eos_token_id=V - 1, pad_token_id=V - 1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, image_size=64, patch_size=16),
        projection_dim=32,
    )  # fmt: skip
    torch.manual_seed(0)
    Owlv2ForObjectDetection(cfg).save_pretrained(d)
    Owlv2Processor(
        image_processor=Owlv2ImageProcessor(size={"height": 64, "width": 64}), tokenizer=tok
    ).save_pretrained(d)
    return d


def test_c20_owlv2_boxes_in_original_frame(tmp_path: Path) -> None:
    from umgclip.annotate.backends.transformers_hf import HFOwlDetector

    det = HFOwlDetector(str(_tiny_owlv2(tmp_path / "owl")), threshold=0.0)
    raw: list[torch.Tensor] = []
    det.model.register_forward_hook(lambda m, i, o: raw.append(o.pred_boxes.detach().clone()))
    rng = np.random.default_rng(0)
    sizes = [(120, 40), (30, 90)]  # (w, h): landscape and portrait
    ims = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for w, h in sizes]
    names = ["cat", "dog", "car"]
    res = det.detect(ims, names)
    assert len(res) == 2 and len(raw) == 1
    for b, ((w, h), r) in enumerate(zip(sizes, res)):
        # Hand mapping: OWLv2 pads bottom/right to a square of side max(w, h), then resizes;
        # normalised (cx, cy, bw, bh) are fractions of that square.
        cx, cy, bw, bh = raw[0][b].double().unbind(-1)
        side = max(w, h)
        exp = torch.stack(
            [
                (cx - bw / 2) * side,
                (cy - bh / 2) * side,
                (cx + bw / 2) * side,
                (cy + bh / 2) * side,
            ],
            -1,
        )
        exp[:, 0::2] = exp[:, 0::2].clamp(0, w)
        exp[:, 1::2] = exp[:, 1::2].clamp(0, h)
        assert len(r) == exp.shape[0] == 16  # threshold 0 keeps every query box
        np.testing.assert_allclose(np.sort(r.boxes, 0), np.sort(exp.numpy(), 0), atol=1e-3)
        assert set(r.labels) <= set(names)
