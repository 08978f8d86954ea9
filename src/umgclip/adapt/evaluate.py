"""Evaluation of adapted models on in-memory panoptic items: adapted mIoU (and the zero-shot mIoU
of the same frozen backbone under the same protocol), PQ/SQ/RQ with and without the open-vocabulary
ensemble, each over all, seen and held-out classes.

Metrics are computed at the adaptation input resolution (longest side = ``data.size``), on the
image content only (padding ignored): the same protocol for the zero-shot and adapted numbers.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from umgclip.adapt.data import IGNORE, PanopticItem
from umgclip.adapt.metrics import PanopticMeter, panoptic_to_pairs
from umgclip.eval.segmentation import MeanIoU


def inference_context(device: torch.device, precision: str) -> contextlib.ExitStack:
    """no_grad + bf16 autocast (DESIGN 7: not inference_mode, which loses the fast path)."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.no_grad())
    if precision == "bf16":
        stack.enter_context(torch.autocast(device.type, dtype=torch.bfloat16))
    return stack


def _batches(items: list[PanopticItem], bs: int) -> Iterator[list[PanopticItem]]:
    for i in range(0, len(items), bs):
        yield items[i : i + bs]


def _subset_miou(iou: list[float], classes: list[int]) -> float:
    vals = [iou[c] for c in classes if not math.isnan(iou[c])]
    return sum(vals) / len(vals) if vals else float("nan")


def _gt_pairs(it: PanopticItem, void: int) -> torch.Tensor:
    h, w = it.content
    segs = [{"id": i + 1, "category": c} for i, c in enumerate(it.labels)]
    return panoptic_to_pairs(it.segments[:h, :w], segs, void)


def evaluate_adapted(
    model: Any, items: list[PanopticItem], batch_size: int = 8, precision: str = "bf16"
) -> dict[str, float]:
    """Flat metrics dict, in percent like ``umgclip eval``. semseg: ``semseg/mIoU_adapted`` and
    ``semseg/mIoU_zeroshot``; panoptic: ``panoptic/PQ|SQ|RQ`` (ensemble as configured),
    ``panoptic/PQ_invocab`` and ``panoptic/PQ_openvocab``. With held-out classes each also comes
    as ``_seen``/``_unseen``; panoptic ``_seen`` is always reported."""
    if not items:
        raise ValueError("evaluate_adapted: no items")
    model.eval()
    dev = model.class_emb.device
    vocab = model.vocab
    k = len(vocab.names)
    seen = [i for i, s in enumerate(vocab.seen) if s]
    unseen = [i for i, s in enumerate(vocab.seen) if not s]
    out: dict[str, float] = {"num_images": float(len(items))}
    if model.cfg.task == "semseg":
        adapted, zeroshot = MeanIoU(k, IGNORE), MeanIoU(k, IGNORE)
        for batch in _batches(items, batch_size):
            x = torch.stack([it.image for it in batch]).to(dev)
            with inference_context(dev, precision):
                logits = model(x).float()
                dense = model.frozen_dense(x).float()
            zs = torch.einsum("bdhw,kd->bkhw", F.normalize(dense, dim=1), model.class_emb)
            for lg, z, it in zip(logits, zs, batch):
                h, w = it.content
                gt = it.semantic[:h, :w]
                for meter, lgt in ((adapted, lg), (zeroshot, z)):
                    up = F.interpolate(
                        lgt[None], size=x.shape[-2:], mode="bilinear", align_corners=False
                    )
                    meter.update(up[0, :, :h, :w].argmax(0).cpu(), gt)
        a, z = adapted.compute(), zeroshot.compute()
        iou_a = a["iou_per_class"]
        iou_z = z["iou_per_class"]
        out["semseg/mIoU_adapted"] = a["mIoU"]
        out["semseg/mIoU_zeroshot"] = z["mIoU"]
        if unseen:  # hold-out runs: seen / unseen split of the same per-class IoUs
            out["semseg/mIoU_adapted_seen"] = _subset_miou(iou_a, seen)
            out["semseg/mIoU_adapted_unseen"] = _subset_miou(iou_a, unseen)
            out["semseg/mIoU_zeroshot_unseen"] = _subset_miou(iou_z, unseen)
        return out
    things = [i for i in range(k) if vocab.is_thing[i]]
    stuffs = [i for i in range(k) if not vocab.is_thing[i]]
    meters = {"invocab": PanopticMeter(things, stuffs), "openvocab": PanopticMeter(things, stuffs)}
    for batch in _batches(items, batch_size):
        x = torch.stack([it.image for it in batch]).to(dev)
        with inference_context(dev, precision):
            dec = model(x)
            dec = {kk: v.float() for kk, v in dec.items()}
            res = {
                "invocab": model.predict_panoptic_batch(x, open_vocab=False, out=dec),
                "openvocab": model.predict_panoptic_batch(x, open_vocab=True, out=dec),
            }
        for name, results in res.items():
            m = meters[name]
            for r, it in zip(results, batch):
                h, w = it.content
                m.update(
                    panoptic_to_pairs(r.segmentation[:h, :w].cpu(), r.segments, m.unpredicted),
                    _gt_pairs(it, m.void),
                )
    main = "openvocab" if model.cfg.inference.open_vocab else "invocab"
    for name, m in meters.items():
        for sub, cls in (("", None), ("_seen", seen), ("_unseen", unseen)):
            if sub == "_unseen" and not unseen:
                continue
            r = m.compute(cls)
            out[f"panoptic/PQ_{name}{sub}"] = 100 * r["PQ"]
            if name == main:
                for key in ("PQ", "SQ", "RQ"):
                    out[f"panoptic/{key}{sub}"] = 100 * r[key]
    return out


def evaluate_adapted_run(
    run_dir: str | Path,
    shard_dir: str | Path,
    split: str = "val",
    batch_size: int = 8,
    precision: str = "bf16",
    device: str = "cpu",
    max_images: int = 0,
) -> dict[str, float]:
    """Load an adapted checkpoint (an ``umgclip adapt`` run folder or its ``adapted/``) and
    evaluate it on the panoptic images of ``split`` in ``shard_dir`` (imported shards), with the
    geometry it was trained with. Returns :func:`evaluate_adapted`'s keys (``umgclip eval
    --adapted`` merges them into its metrics)."""
    from umgclip.adapt.data import load_items
    from umgclip.adapt.model import ADAPTED_META, load_adapted
    from umgclip.data.shards import SkipCounter

    p = Path(run_dir)
    if not (p / ADAPTED_META).is_file() and (p / "adapted" / ADAPTED_META).is_file():
        p = p / "adapted"
    if not (p / ADAPTED_META).is_file():
        raise FileNotFoundError(f"{run_dir} is neither an `umgclip adapt` run nor its adapted/")
    model = load_adapted(p, device=device)
    pre = model.backbone.preprocess_cfg
    skips = SkipCounter()
    items = load_items(
        shard_dir, split, model.vocab, model.cfg.data.size, pre.mean, pre.std, max_images, skips
    )
    if not items:
        raise ValueError(f"no panoptic images in the {split} split of {shard_dir}")
    out = evaluate_adapted(model, items, batch_size, precision)
    out.pop("num_images")
    out[f"{model.cfg.task}/num_images_adapted"] = float(len(items))
    return out
