"""``umgclip data`` commands: import-coco, stats, show."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="import, inspect and draw datasets")
    dsub = p.add_subparsers(dest="data_command", metavar="DATA_COMMAND")

    imp = dsub.add_parser("import-coco", help="COCO captions/instances/panoptic -> shards")
    imp.add_argument("root", type=Path, help="COCO folder (annotations/, images/, panoptic/)")
    imp.add_argument("--out", type=Path, required=True, help="output shard folder")
    imp.add_argument(
        "--captions", type=Path, help="captions JSON (default ROOT/annotations/captions.json)"
    )
    imp.add_argument("--instances", type=Path, help="instances JSON")
    imp.add_argument("--panoptic", type=Path, help="panoptic JSON")
    imp.add_argument("--panoptic-dir", type=Path, help="panoptic PNG folder")
    imp.add_argument("--images", type=Path, help="image folder")
    imp.add_argument("--val-fraction", type=float, default=0.2)
    imp.add_argument("--shard-size", type=int, default=1000)
    imp.set_defaults(func=_import_coco)

    st = dsub.add_parser("stats", help="JSON counts of a shard folder")
    st.add_argument("shards", help="shard folder or glob")
    st.set_defaults(func=_stats)

    sh = dsub.add_parser("show", help="draw one sample's regions, masks, tags, caption")
    sh.add_argument("shards", help="shard folder or glob")
    sh.add_argument("--key", required=True)
    sh.add_argument("--out", type=Path, required=True, help="PNG file")
    sh.set_defaults(func=_show)
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])


def _import_coco(args: argparse.Namespace) -> int:
    from umgclip.data.coco import import_coco

    index = import_coco(
        args.root,
        args.out,
        captions=args.captions,
        instances=args.instances,
        panoptic=args.panoptic,
        panoptic_dir=args.panoptic_dir,
        images=args.images,
        val_fraction=args.val_fraction,
        shard_size=args.shard_size,
    )
    summary = {
        "out": str(args.out),
        "counts": index["counts"],
        "splits": {s: v["images"] for s, v in index["splits"].items()},
        "skipped": index["skipped"]["total"],
    }
    print(json.dumps(summary, indent=1))
    return 0


def _stats(args: argparse.Namespace) -> int:
    from umgclip.data.stats import shard_stats

    print(json.dumps(shard_stats(args.shards), indent=1))
    return 0


def _show(args: argparse.Namespace) -> int:
    import numpy as np

    from umgclip.data.masks import decode_rle
    from umgclip.data.shards import iter_shard_samples, list_shards
    from umgclip.viz import show_sample

    for d in iter_shard_samples(list_shards(args.shards)):
        s = d.sample
        if s.key != args.key:
            continue
        labels = [
            f"{r.kind[0]}:{','.join(r.tags)}" + (" (crowd)" if r.iscrowd else "") for r in s.regions
        ]
        masks = [decode_rle(r.mask) if r.mask else None for r in s.regions]
        title = f"{s.key} [{s.split}] tags: {', '.join(s.tags)}\n{s.captions[0] if s.captions else '(no caption)'}"
        out = show_sample(
            np.asarray(d.image),
            np.array([r.box for r in s.regions]),
            labels,
            masks,
            title,
            args.out,
        )
        print(out)
        return 0
    print(f"key {args.key!r} not found in {args.shards}", file=sys.stderr)
    return 1
