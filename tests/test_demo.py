"""``umgclip demo`` end to end with a micro model and budget, and its failure path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from umgclip.cli import main
from umgclip.eval.evaluate import CORE_KEYS

MICRO = """
model:
  name: umg-vit-tiny
data:
  shards: unused
  split: train
  batch_size: 8
  workers: 0
  shuffle_buffer: 16
  max_regions: 4
schedule:
  steps: 2
  warmup_steps: 1
loss:
  itc: 1.0
  rtc: {w}
  image_tag: {t}
  region_tag: {t}
bf16: true
log_every: 1
checkpoint_every: 0
progress: false
"""


@pytest.mark.slow
def test_demo_smoke_and_reuse(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    umg, clip = tmp_path / "umg.yaml", tmp_path / "clip.yaml"
    umg.write_text(MICRO.format(w=1.0, t=0.5))
    clip.write_text(MICRO.format(w=0.0, t=0.0))
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--seeds", "0", "1", "--umg-config", str(umg),
            "--clip-config", str(clip), "--eval-max-images", "4"]  # fmt: skip
    assert main(args) == 0
    report = (out / "report.md").read_text()
    for k in CORE_KEYS:
        assert f"`{k}`" in report
    assert "## The claim" in report and "curves.png" in report
    pngs = sorted((out / "overlays").glob("*.png"))
    assert len(pngs) == 4 and all(f"overlays/{p.name}" in report for p in pngs)
    assert (out / "curves.png").is_file()
    evals = {p.name: json.loads(p.read_text()) for p in (out / "eval").glob("*.json")}
    assert sorted(evals) == [
        "clip-seed0.json",
        "clip-seed1.json",
        "umg-seed0.json",
        "umg-seed1.json",
    ]
    assert all(e["retrieval/num_images"] == 4 for e in evals.values())
    # The baseline trained with image-text only: its curves have no region terms.
    clip_log = (out / "runs" / "clip-seed0" / "metrics.jsonl").read_text()
    umg_log = (out / "runs" / "umg-seed0" / "metrics.jsonl").read_text()
    assert '"rtc"' in umg_log and '"rtc"' not in clip_log
    # Second run: every step is reused, nothing retrained or re-evaluated.
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "eval").glob("*.json")}
    capsys.readouterr()
    assert main(args) == 0
    said = capsys.readouterr().out
    assert said.count("reusing") >= 9  # data + 4 runs + 4 evaluations
    assert "train umg seed 0: 2 steps" not in said
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    # A changed config is not reused: that model is retrained and re-evaluated, the other kept.
    umg.write_text(MICRO.format(w=0.5, t=0.25))
    capsys.readouterr()
    assert main(args) == 0
    said = capsys.readouterr().out
    assert "train umg seed 0: the config changed" in said
    assert "train umg seed 0: 2 steps" in said and "train clip seed 0: reusing" in said
    after = {p: p.stat().st_mtime_ns for p in mtimes}
    assert after[out / "eval" / "umg-seed0.json"] != mtimes[out / "eval" / "umg-seed0.json"]
    assert after[out / "eval" / "clip-seed0.json"] == mtimes[out / "eval" / "clip-seed0.json"]


def test_demo_without_data_says_where_it_looked(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import umgclip.paths

    monkeypatch.setattr(umgclip.paths, "find_coco_mg", lambda: None)
    monkeypatch.setenv("UMGCLIP_DATA", str(tmp_path / "nowhere"))
    rc = main(["demo", "--out", str(tmp_path / "demo")])
    err = capsys.readouterr().err
    assert rc != 0
    assert str(tmp_path / "nowhere" / "coco_mg") in err and "UMGCLIP_DATA" in err
    assert not (tmp_path / "demo").exists()
