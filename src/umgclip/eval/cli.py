"""``umgclip eval`` and ``umgclip predict``."""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


def resolve_checkpoint(path: str | Path) -> Path:
    """A saved model folder, or a training run folder (its ``final/`` model)."""
    p = Path(path)
    for cand in (p, p / "final"):
        if (cand / "config.json").is_file() and (cand / "model.safetensors").is_file():
            return cand
    raise FileNotFoundError(
        f"{p} is not a saved umgclip model (config.json + model.safetensors) nor a training run "
        "folder with final/; pass e.g. runs/umg-lite-coco/final"
    )


def _load(args: argparse.Namespace):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from umgclip.model.registry import load_model

    return load_model(resolve_checkpoint(args.checkpoint), device=args.device)


def run_eval(args: argparse.Namespace) -> int:
    from umgclip.eval.evaluate import EvalConfig, evaluate
    from umgclip.eval.report import format_metrics

    model = _load(args)
    cfg = EvalConfig(
        batch_size=args.batch_size,
        device=args.device,
        precision=args.precision,
        groups=tuple(args.groups or ()),
        max_images=args.max_images,
    )
    metrics = evaluate(model, args.data, args.split, cfg)
    for run in getattr(args, "adapted", None) or ():  # adapted checkpoints (umgclip.adapt)
        from umgclip.adapt.evaluate import evaluate_adapted_run

        extra = evaluate_adapted_run(
            run, args.data, args.split, args.batch_size, args.precision, args.device,
            args.max_images or 0,
        )  # fmt: skip
        clash = sorted(set(extra) & set(metrics))
        if clash:
            raise SystemExit(f"eval --adapted: {run} repeats metrics {clash} (one run per task)")
        metrics.update(extra)
    print(format_metrics(metrics))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
        print(f"metrics written to {out}")
    return 1 if metrics.get("eval/failed_groups", 0) else 0


def run_predict(args: argparse.Namespace) -> int:
    from umgclip.data.images import load_image
    from umgclip.eval.evaluate import EvalConfig
    from umgclip.eval.overlay import draw_prediction
    from umgclip.eval.predict import parse_labels, predict, read_boxes

    if getattr(args, "task", "open") == "panoptic":  # adapted panoptic model (umgclip.adapt)
        from umgclip.adapt.cli import run_predict_panoptic

        return run_predict_panoptic(args)
    if not args.labels:
        raise SystemExit("predict: --labels is required (except with --task panoptic)")
    labels = parse_labels(args.labels)
    boxes = read_boxes(args.boxes) if args.boxes else None
    image = load_image(args.image)
    model = _load(args)
    pred = predict(model, image, labels, boxes, EvalConfig(device=args.device))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    draw_prediction(image, pred.result, pred.label_map, out, title=Path(args.image).name)
    pred.result["image"] = str(args.image)
    js = out.with_suffix(".json")
    js.write_text(json.dumps(pred.result, indent=2) + "\n")
    for t in pred.result["tags"][:5]:
        print(f"  {t['label']:<24} {t['score']:.3f}")
    for b in pred.result["boxes"]:
        print(f"  box {[round(v, 1) for v in b['box']]}: {b['label']}")
    print(f"overlay: {out}\nresult:  {js}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval", help="evaluate a model: retrieval, tagging, regions, zero-shot semseg"
    )
    p.add_argument("checkpoint", help="saved model folder (or a training run folder)")
    p.add_argument("--data", required=True, help="folder of imported shards (umgclip data ...)")
    p.add_argument("--split", default="val")
    p.add_argument("--out", default=None, help="write the metrics as JSON here")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--groups", nargs="*", help="metric groups to run (default: all)")
    p.add_argument("--max-images", type=int, default=None, help="only the first N samples")
    p.add_argument(
        "--adapted", nargs="+", default=None, metavar="RUN_DIR",
        help="also evaluate `umgclip adapt` runs: semseg/mIoU_adapted, panoptic/PQ|SQ|RQ",
    )  # fmt: skip
    p.set_defaults(func=run_eval)

    q = subparsers.add_parser("predict", help="tags, labelled boxes and segmentation of an image")
    q.add_argument("checkpoint", help="saved model folder (or a training run folder)")
    q.add_argument("image")
    q.add_argument("--labels", default=None, help='comma-separated vocabulary, e.g. "cat,dog,sky"')
    q.add_argument(
        "--task",
        choices=("open", "panoptic"),
        default="open",
        help="panoptic: CHECKPOINT is an adapted panoptic model (umgclip adapt output)",
    )
    q.add_argument("--boxes", default=None, help="JSON list of [x0,y0,x1,y1] in image pixels")
    q.add_argument("--out", required=True, help="overlay PNG (the JSON goes next to it)")
    q.add_argument("--device", default="cpu")
    q.set_defaults(func=run_predict)
