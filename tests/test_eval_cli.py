"""``umgclip eval`` / ``umgclip predict`` end to end on a tiny saved model and real COCO shards."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from umgclip.cli import main
from umgclip.eval.evaluate import CORE_KEYS, METRIC_GROUPS, EvalConfig, evaluate

N_IMAGES = 6


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import umgclip

    torch.manual_seed(0)
    model = umgclip.create_model("umg-vit-tiny")
    out = tmp_path_factory.mktemp("tiny_model") / "model"
    model.save_pretrained(out)
    return out


def test_eval_cli_writes_every_stable_key(
    tiny_model_dir: Path, imported_coco: Path, tmp_path: Path
) -> None:
    out = tmp_path / "metrics.json"
    rc = main(
        ["eval", str(tiny_model_dir), "--data", str(imported_coco), "--split", "val",
         "--out", str(out), "--batch-size", "4", "--max-images", str(N_IMAGES)]
    )  # fmt: skip
    assert rc == 0
    m = json.loads(out.read_text())
    for k in CORE_KEYS:
        assert k in m and 0.0 <= m[k] <= 100.0, k
    n, c = int(m["retrieval/num_images"]), int(m["retrieval/num_captions"])
    assert n == N_IMAGES and c >= 5 * N_IMAGES
    # R@k is a count of hits over the queries: a multiple of one query's worth.
    for k in ("i2t_R@1", "i2t_R@5"):
        hits = m[f"retrieval/{k}"] * n / 100
        assert hits == pytest.approx(round(hits), abs=1e-3)
    assert m["retrieval/i2t_R@1"] <= m["retrieval/i2t_R@5"] <= m["retrieval/i2t_R@10"]
    assert m["regions/box_top1"] <= m["regions/box_top5"]
    assert m["regions/num_boxes"] > 0 and m["eval/failed_groups"] == 0


def test_eval_retrieval_agrees_with_direct_encoding(
    tiny_model_dir: Path, imported_coco: Path
) -> None:
    # Independent path: encode the same images and captions one by one in fp32 and rank by hand.
    from umgclip.data.shards import iter_shard_samples, list_shards
    from umgclip.eval.geometry import prepare
    from umgclip.model.registry import load_model

    model = load_model(tiny_model_dir)
    cfg = EvalConfig(batch_size=3, precision="fp32", groups=("retrieval",), max_images=N_IMAGES)
    m = evaluate(model, imported_coco, "val", cfg)
    samples = list(iter_shard_samples(list_shards(imported_coco, "val")))[:N_IMAGES]
    with torch.no_grad():
        img = torch.cat([model.encode_image(prepare(s.image, model.preprocess_cfg).image[None])
                         for s in samples])  # fmt: skip
        caps = [(i, c) for i, s in enumerate(samples) for c in s.sample.captions if c.strip()]
        txt = model.encode_text(model.tokenizer([c for _, c in caps]))
    owner = torch.tensor([i for i, _ in caps])
    sim = img @ txt.T
    best_caption_owner = owner[sim.argmax(dim=1)]
    i2t_r1 = 100 * (best_caption_owner == torch.arange(len(samples))).float().mean().item()
    t2i_r1 = 100 * (sim.argmax(dim=0) == owner).float().mean().item()
    assert m["retrieval/i2t_R@1"] == pytest.approx(i2t_r1)
    assert m["retrieval/t2i_R@1"] == pytest.approx(t2i_r1)


def test_metric_group_registry_is_extensible(tiny_model_dir: Path, imported_coco: Path) -> None:
    from umgclip.eval.evaluate import register_metric_group
    from umgclip.model.registry import load_model

    @register_metric_group("test_count")
    def _count(ctx):  # type: ignore[no-untyped-def]
        return {"images": sum(1 for _ in ctx.samples())}

    try:
        cfg = EvalConfig(groups=("test_count",), max_images=3)
        m = evaluate(load_model(tiny_model_dir), imported_coco, "val", cfg)
        assert m["test_count/images"] == 3.0
        with pytest.raises(ValueError, match="unknown metric group"):
            evaluate(load_model(tiny_model_dir), imported_coco, "val", EvalConfig(groups=("x",)))
    finally:
        METRIC_GROUPS.pop("test_count")


def test_predict_cli_maps_boxes_to_original_pixels(tiny_model_dir: Path, tmp_path: Path) -> None:
    # A non-square image (C20): the boxes in the JSON are the given ones, in original pixels.
    img = Image.new("RGB", (120, 60), (30, 120, 200))
    img.paste((250, 20, 20), (10, 10, 50, 50))
    ip = tmp_path / "img.png"
    img.save(ip)
    boxes = [[10.0, 10.0, 50.0, 50.0], [60.0, 5.0, 118.0, 55.0], [500.0, 500.0, 600.0, 600.0]]
    bp = tmp_path / "boxes.json"
    bp.write_text(json.dumps(boxes))
    out = tmp_path / "pred.png"
    rc = main(
        ["predict", str(tiny_model_dir), str(ip), "--labels", "red square, blue sky,cat,",
         "--boxes", str(bp), "--out", str(out)]
    )  # fmt: skip
    assert rc == 0 and out.is_file()
    with Image.open(out) as im:
        assert im.size[0] > 100
    r = json.loads(out.with_suffix(".json").read_text())
    assert r["labels"] == ["red square", "blue sky", "cat"]
    assert sorted(t["label"] for t in r["tags"]) == sorted(r["labels"])
    assert math.isclose(sum(t["score"] for t in r["tags"]), 1.0, rel_tol=1e-4)
    assert [b["box"] for b in r["boxes"]] == boxes
    for b, given in zip(r["boxes"][:2], boxes[:2]):
        assert b["label"] in r["labels"]
        assert b["box_used"] == pytest.approx(given, abs=0.05)
    assert r["boxes"][2]["label"] is None  # wholly outside: reported, not silently moved
    assert r["boxes"][2]["error"] == "outside the image"
    assert math.isclose(sum(r["segmentation"].values()), 1.0, abs_tol=1e-3)


def test_c17_predict_reports_each_bad_box_and_labels_the_rest(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    from umgclip.eval.predict import predict
    from umgclip.model.registry import load_model

    img = Image.new("RGB", (120, 60), (30, 120, 200))
    boxes = [
        [10.0, 10.0, 50.0, 50.0],
        [float("nan"), 0.0, 5.0, 5.0],
        [50.0, 10.0, 10.0, 50.0],
        [20.0, 20.0, 20.0, 40.0],
        [60.0, 5.0, 118.0, 55.0],
    ]
    r = predict(load_model(tiny_model_dir), img, ["red", "blue"], boxes).result
    errors = [b.get("error") for b in r["boxes"]]
    assert errors[1].startswith("NaN") and errors[2].startswith("inverted")
    assert errors[3] == "zero-area box"
    # The good boxes around the bad ones are labelled, from their own place in the image.
    assert [b["label"] is not None for b in r["boxes"]] == [True, False, False, False, True]
    assert r["boxes"][4]["box_used"] == pytest.approx(boxes[4], abs=0.05)


def test_eval_cli_rejects_a_non_model_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["eval", str(tmp_path), "--data", str(tmp_path)]) == 2
    assert "not a saved umgclip model" in capsys.readouterr().err
    # --verbose keeps the exception (and its traceback) for bug reports.
    with pytest.raises(FileNotFoundError, match="not a saved umgclip model"):
        main(["-v", "eval", str(tmp_path), "--data", str(tmp_path)])
