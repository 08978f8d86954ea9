"""Report tables: mean +- spread over seeds, differences, and the one-query drop flag."""

from __future__ import annotations

import pytest

from umgclip.eval.report import comparison_table, format_metrics, mean_spread


def test_mean_spread() -> None:
    assert mean_spread([10.0, 14.0]) == (12.0, 2.0)
    assert mean_spread([5.0]) == (5.0, 0.0)


def _m(i2t1: float, box1: float) -> dict[str, float]:
    return {
        "retrieval/i2t_R@1": i2t1,
        "retrieval/num_images": 50.0,  # one query = 2 points
        "regions/box_top1": box1,
        "regions/num_boxes": 400.0,
    }


def test_comparison_flags_a_drop_larger_than_one_query() -> None:
    keys = ("retrieval/i2t_R@1", "regions/box_top1")
    # i2t: 10 vs 14 = -4 points, two queries' worth -> flagged.
    rows = comparison_table([_m(10, 30), _m(10, 32)], [_m(14, 20), _m(14, 20)], keys).splitlines()
    i2t = next(r for r in rows if "i2t_R@1" in r)
    assert "10.00 ± 0.00" in i2t and "14.00 ± 0.00" in i2t and "-4.00" in i2t
    assert "| 50 |" in i2t and "drop > one query (2.00 pts)" in i2t
    box = next(r for r in rows if "box_top1" in r)
    assert "31.00 ± 1.00" in box and "+11.00" in box and "drop" not in box
    # -1.5 points is within one query (2 points): not a drop, says so.
    rows = comparison_table([_m(12.5, 0)], [_m(14, 0)], keys)
    assert "within one query (2.00 pts)" in rows and "drop >" not in rows


def test_format_metrics_shows_counts() -> None:
    text = format_metrics({**_m(12.0, 30.0), "semseg/mIoU": float("nan")})
    line = next(ln for ln in text.splitlines() if ln.startswith("retrieval/i2t_R@1"))
    assert "12.00" in line and "(n=50)" in line
    assert "n/a" in next(ln for ln in text.splitlines() if ln.startswith("semseg/mIoU"))
    with pytest.raises(StopIteration):
        next(ln for ln in text.splitlines() if ln.startswith("tagging"))
