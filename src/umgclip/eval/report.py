"""Text renderings of metrics: the ``umgclip eval`` table and the demo's comparison tables."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence

from umgclip.eval.evaluate import CORE_KEYS

#: Which count gives each metric's number of queries (one query's worth = 100 / count points).
QUERY_COUNTS: dict[str, str] = {
    "retrieval/i2t_R@1": "retrieval/num_images",
    "retrieval/i2t_R@5": "retrieval/num_images",
    "retrieval/i2t_R@10": "retrieval/num_images",
    "retrieval/t2i_R@1": "retrieval/num_captions",
    "retrieval/t2i_R@5": "retrieval/num_captions",
    "retrieval/t2i_R@10": "retrieval/num_captions",
    "tagging/mAP": "tagging/num_images",
    "regions/box_top1": "regions/num_boxes",
    "regions/box_top5": "regions/num_boxes",
    "regions/mask_top1": "regions/num_masks",
    "semseg/mIoU": "semseg/num_images",
}


def _fmt(v: float) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"


def format_metrics(m: Mapping[str, float]) -> str:
    """A fixed-width table of one evaluation: core metrics first, then everything else."""
    keys = [k for k in CORE_KEYS if k in m] + sorted(k for k in m if k not in CORE_KEYS)
    w = max(len(k) for k in keys) if keys else 10
    lines = [f"{'metric':<{w}}  value", f"{'-' * w}  -------"]
    for k in keys:
        v = m[k]
        s = f"{int(v)}" if k.split("/")[-1].startswith(("num_", "skipped", "failed")) else _fmt(v)
        n = QUERY_COUNTS.get(k)
        extra = f"   (n={int(m[n])})" if n and n in m and not math.isnan(m[n]) else ""
        lines.append(f"{k:<{w}}  {s:>7}{extra}")
    return "\n".join(lines)


def mean_spread(values: Sequence[float]) -> tuple[float, float]:
    """Mean and half the range (max - min) / 2 over seeds; the spread is 0 for one seed."""
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (max(vals) - min(vals)) / 2


def comparison_table(
    ours: Sequence[Mapping[str, float]],
    base: Sequence[Mapping[str, float]],
    keys: Sequence[str] = CORE_KEYS,
    names: tuple[str, str] = ("UMG-CLIP", "CLIP baseline"),
) -> str:
    """Markdown table: per metric, mean +- spread over seeds for both models, the difference
    of means, the number of queries and a flag when a retrieval drop exceeds one query's worth
    (and a note when a difference is no larger than the two seed spreads added)."""
    rows = [
        f"| metric | {names[0]} | {names[1]} | difference | queries | note |",
        "|---|---|---|---|---|---|",
    ]
    for k in keys:
        a, sa = mean_spread([m.get(k, float("nan")) for m in ours])
        b, sb = mean_spread([m.get(k, float("nan")) for m in base])
        d = a - b
        ck = QUERY_COUNTS.get(k)
        n = ours[0].get(ck, float("nan")) if ck and ours else float("nan")
        note = ""
        # One query's worth is meaningful only for averages over queries (retrieval, regions);
        # mAP and mIoU average over classes, so no per-query note for them.
        per_query = k.startswith(("retrieval/", "regions/"))
        if per_query and not math.isnan(n) and n > 0 and not math.isnan(d):
            one = 100.0 / n
            if k.startswith("retrieval/") and d < -one:
                note = f"drop > one query ({one:.2f} pts)"
            elif abs(d) <= one:
                note = f"within one query ({one:.2f} pts)"
            if len(ours) > 1 and abs(d) > one and abs(d) <= sa + sb:
                note += ("; " if note else "") + "within the seed spread"
        qs = "" if math.isnan(n) else str(int(n))
        rows.append(
            f"| `{k}` | {_fmt(a)} ± {_fmt(sa)} | {_fmt(b)} ± {_fmt(sb)} | "
            f"{'+' if d > 0 else ''}{_fmt(d)} | {qs} | {note} |"
        )
    return "\n".join(rows)
