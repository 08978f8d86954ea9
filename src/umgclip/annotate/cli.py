"""``umgclip annotate`` and ``umgclip annotate-eval``."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "annotate", help="auto-annotate images or shards (tags, boxes, masks, captions)"
    )
    p.add_argument(
        "input", help="folder of images, or webdataset / img2dataset shards (folder or glob)"
    )
    p.add_argument(
        "--config",
        default=None,
        help="pipeline YAML (default: configs/annotate-default.yaml values)",
    )
    p.add_argument(
        "--out", required=True, help="output folder (shards + manifest.json + summary.json)"
    )
    p.add_argument("--executor", choices=["local", "ray"], default="local")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="K=V")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_annotate)

    e = sub.add_parser("annotate-eval", help="score annotations against imported COCO shards")
    e.add_argument("pred_dir")
    e.add_argument("gt_dir")
    e.add_argument("--split", default=None, help="GT split to read (e.g. val)")
    e.set_defaults(func=_eval)


def _annotate(args: argparse.Namespace) -> int:
    from umgclip.annotate.config import AnnotateConfig
    from umgclip.annotate.pipeline import annotate
    from umgclip.config import load_config

    cfg = load_config(AnnotateConfig, args.config, args.overrides)
    summary = annotate(
        args.input, args.out, cfg, executor=args.executor, progress=not args.no_progress
    )
    print(json.dumps({k: summary[k] for k in ("images", "errors", "chunks")}))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from umgclip.annotate.evaluate import run_eval

    print(json.dumps(run_eval(args.pred_dir, args.gt_dir, split=args.split), indent=1))
    return 0
