"""Does the open-vocabulary ensemble recover classes never seen in adaptation training?

Adapts a panoptic decoder with 10 classes held out (their segments are removed from the
training targets), then reports PQ on the held-out ("unseen") and the other ("seen") classes of
the val split, with the in-vocabulary head alone and with the FC-CLIP geometric ensemble.

    python benchmarks/adapt_holdout.py --out runs/adapt/holdout   # the config's backbone and steps
"""

from __future__ import annotations

import argparse
import json
import logging
from collections import Counter
from pathlib import Path

from umgclip.adapt.config import AdaptConfig
from umgclip.adapt.train import adapt, resolve_shards
from umgclip.config import load_config
from umgclip.data.shards import iter_shard_samples, list_shards


def default_holdout(shards: Path, n: int = 10) -> list[str]:
    """The n most frequent val classes (by segment count, then name), "person" excluded: it is
    in most images and holding it out would mostly measure a crippled training set."""
    val, train = Counter(), Counter()
    for split, counter in (("val", val), ("train", train)):
        for s in iter_shard_samples(list_shards(shards, split)):
            for seg in (s.sample.panoptic or {}).get("segments", []):
                counter[seg["category"]] += 1
    ranked = sorted((c for c in val if c != "person" and train[c] > 0), key=lambda c: (-val[c], c))
    return ranked[:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/adapt-panoptic-coco.yaml")
    ap.add_argument("--backbone", default=None, help="default: the config's (the demo's)")
    ap.add_argument("--steps", type=int, default=None, help="default: the config's")
    ap.add_argument("--out", default="runs/adapt/holdout")
    ap.add_argument("--holdout", nargs="*", help="class names (default: 10 frequent val classes)")
    ap.add_argument("--set", action="append", default=[], help="extra config overrides")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    cfg = load_config(AdaptConfig, args.config, args.set)
    cfg.out_dir = args.out
    cfg.backbone = args.backbone or cfg.backbone
    cfg.train.steps = args.steps or cfg.train.steps
    shards = resolve_shards(cfg.data.source, Path(args.out).parent / "_adapt_shards")
    cfg.data.source = str(shards)
    cfg.data.holdout_classes = args.holdout or default_holdout(shards)
    run = adapt(cfg)
    m = json.loads((run / "metrics.json").read_text())
    rows = [
        ("in-vocabulary head", "panoptic/PQ_invocab_seen", "panoptic/PQ_invocab_unseen"),
        ("+ open-vocab ensemble", "panoptic/PQ_openvocab_seen", "panoptic/PQ_openvocab_unseen"),
    ]
    print(f"held out: {', '.join(cfg.data.holdout_classes)}")
    print(f"{'':24s} {'PQ seen':>8s} {'PQ unseen':>10s}")
    for name, s, u in rows:
        print(f"{name:24s} {m[s]:8.2f} {m[u]:10.2f}")  # percent
    print(f"PQ/SQ/RQ (all, ensemble): {m['panoptic/PQ']:.2f} / {m['panoptic/SQ']:.2f} / "
          f"{m['panoptic/RQ']:.2f}; train {m['train_seconds']:.0f} s")  # fmt: skip
    summary = {"holdout": cfg.data.holdout_classes, **{k: m[k] for r in rows for k in r[1:]}}
    (run / "holdout_summary.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
