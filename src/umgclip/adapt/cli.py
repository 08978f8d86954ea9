"""``umgclip adapt CONFIG.yaml [--set k=v ...]``: parameter-efficient adaptation to a dense task."""

from __future__ import annotations

import argparse
import json

from umgclip.adapt.config import AdaptConfig
from umgclip.config import load_config


def _run(args: argparse.Namespace) -> int:
    from umgclip.adapt.train import adapt

    cfg = load_config(AdaptConfig, args.config, args.set)
    run = adapt(cfg)
    metrics = json.loads((run / "metrics.json").read_text())
    keys = [k for k in metrics if k.startswith(("semseg/", "panoptic/"))]
    keys += ["params/trainable", "params/total", "params/trainable_fraction", "train_seconds"]
    for k in keys:
        print(
            f"{k:32s} {metrics[k]:.4f}"
            if isinstance(metrics[k], float)
            else f"{k:32s} {metrics[k]}"
        )
    print(f"run folder: {run}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "adapt",
        help="train Convpass adapters + a semseg/panoptic decoder on a frozen backbone",
        description="Freeze a UMG-CLIP backbone, insert Convpass adapters, train a task decoder "
        "(semantic or panoptic segmentation) and evaluate on the val split.",
    )
    p.add_argument("config", help="YAML config (see configs/adapt-*.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.steps=50")  # fmt: skip
    p.set_defaults(func=_run)


def run_predict_panoptic(args: argparse.Namespace) -> int:
    """``umgclip predict ADAPTED_DIR IMAGE --task panoptic --out overlay.png`` (called by the
    eval area's predict command): panoptic segments + an overlay with a legend."""
    from pathlib import Path

    import numpy as np
    from PIL import Image

    from umgclip.adapt.model import load_adapted
    from umgclip.adapt.panoptic_inference import draw_panoptic, predict_panoptic
    from umgclip.data.images import load_image

    ckpt = Path(args.checkpoint)
    if not (ckpt / "adapted.json").is_file() and (ckpt / "adapted" / "adapted.json").is_file():
        ckpt = ckpt / "adapted"  # an adapt run folder
    model = load_adapted(ckpt, device=getattr(args, "device", "cpu"))
    image = load_image(args.image)
    pred = predict_panoptic(model, image)
    out = draw_panoptic(image, pred, args.out)
    # The segment-id map (16-bit PNG, 0 = void) next to the overlay: the JSON's ``id``s index it.
    ids = out.with_name(out.stem + "_ids.png")
    Image.fromarray(pred.segmentation.astype(np.uint16)).save(ids)
    result = {"image": str(args.image), "ids_png": ids.name, "segments": pred.segments}
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    for s in sorted(pred.segments, key=lambda s: -s["area"]):
        print(f"  {s['name']:<24} score {s['score']:.3f}  area {s['area']}")
    print(f"overlay: {out}\nsegments: {out.with_suffix('.json')} + {ids}")
    return 0
