"""User errors at the command line: one clear line and exit code 2, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from umgclip.cli import main


def test_config_typo_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("optim:\n  weight_decy: 0.1\n")
    assert main(["train", str(cfg), "--set", f"output_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert "ConfigError" in err and "weight_decy" in err and "Traceback" not in err


def test_eval_on_non_checkpoint_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["eval", str(tmp_path), "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("umgclip eval: error:") and err.count("\n") == 1


def test_figure_size_is_bounded_for_extreme_aspect() -> None:
    from umgclip.viz import figure_size

    for w, h in [(1, 1000), (1000, 1), (1, 1), (640, 480), (480, 640)]:
        fw, fh = figure_size(w, h)
        assert 0 < fw <= 7.6 and 0 < fh <= 7.6
    # Ordinary images keep their aspect ratio.
    fw, fh = figure_size(640, 480, extra=0)
    assert abs(fh / fw - 0.75) < 1e-9


def test_c03_overlay_of_1x1000_image_is_small(tmp_path: Path) -> None:
    import numpy as np

    from umgclip.eval.overlay import draw_prediction

    img = Image.new("RGB", (1, 1000), "white")
    label_map = np.zeros((1000, 1), dtype=np.int64)
    out = tmp_path / "o.png"
    draw_prediction(img, {"tags": [], "boxes": [], "labels": ["sky"]}, label_map, out=out)
    with Image.open(out) as im:
        assert im.width * im.height < 4_000_000


def test_umgclip_data_env_var_is_authoritative(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, coco_root: Path
) -> None:
    from umgclip.paths import find_coco_mg

    monkeypatch.setenv("UMGCLIP_DATA", str(tmp_path / "nowhere"))
    assert find_coco_mg() is None  # not silently the ../shared/data copy
    monkeypatch.setenv("UMGCLIP_DATA", str(coco_root.parent))
    assert find_coco_mg() == coco_root.resolve()
