"""``evaluate(model, data_dir, split)``: every registered metric group on one split of shards.

Metric groups live in a registry (:data:`METRIC_GROUPS`) so other areas add theirs without
touching this file::

    @register_metric_group("semseg_adapted")
    def _adapted(ctx: EvalContext) -> dict[str, float]:
        ...  # keys come back prefixed "semseg_adapted/"

Each group receives an :class:`EvalContext` that streams the split's samples in batches and
caches what several groups share (image embeddings, class-name text embeddings).

Inference follows DESIGN section 7: ``torch.no_grad()`` + bf16 autocast on CPU (not
``inference_mode``, which disables the fast path), fp32 metrics on the outputs.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from umgclip.data.masks import decode_rle
from umgclip.data.shards import DecodedSample, SkipCounter, iter_shard_samples, list_shards
from umgclip.eval.geometry import content_box, prepare
from umgclip.eval.regions import topk_accuracy
from umgclip.eval.retrieval import retrieval_recall
from umgclip.eval.segmentation import (
    MeanIoU,
    dense_logits,
    logits_to_label_map,
    panoptic_to_semantic,
)
from umgclip.eval.tagging import tagging_map
from umgclip.eval.vocab import COCO_PANOPTIC, COCO_THINGS, TEMPLATES, prompt_name

log = logging.getLogger(__name__)

#: The keys ``umgclip eval`` always writes (stable: reports and tests read them).
CORE_KEYS: tuple[str, ...] = (
    "retrieval/i2t_R@1",
    "retrieval/i2t_R@5",
    "retrieval/i2t_R@10",
    "retrieval/t2i_R@1",
    "retrieval/t2i_R@5",
    "retrieval/t2i_R@10",
    "tagging/mAP",
    "regions/box_top1",
    "regions/box_top5",
    "regions/mask_top1",
    "semseg/mIoU",
)


@dataclass
class EvalConfig:
    """How an evaluation runs.

    ``precision``: ``bf16`` (autocast under no_grad; the CPU default) or ``fp32``.
    ``groups``: metric groups to run (registry names); empty = all registered.
    ``max_images``: evaluate only the first N samples of the split (smoke runs).
    """

    batch_size: int = 16
    device: str = "cpu"
    precision: str = "bf16"
    templates: tuple[str, ...] = TEMPLATES
    groups: tuple[str, ...] = ()
    max_images: int | None = None


MetricGroup = Callable[["EvalContext"], dict[str, float]]
METRIC_GROUPS: dict[str, MetricGroup] = {}


def register_metric_group(name: str) -> Callable[[MetricGroup], MetricGroup]:
    """Register a metric group; its keys are reported as ``name/key``."""

    def deco(fn: MetricGroup) -> MetricGroup:
        if name in METRIC_GROUPS and METRIC_GROUPS[name] is not fn:
            raise ValueError(f"metric group {name!r} is already registered")
        METRIC_GROUPS[name] = fn
        return fn

    return deco


@dataclass
class EvalContext:
    """What a metric group needs: the model, the data, and shared cached computations."""

    model: torch.nn.Module
    shards: list[Path]
    cfg: EvalConfig
    skips: SkipCounter = field(default_factory=SkipCounter)
    _cache: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return torch.device(self.cfg.device)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """no_grad + bf16 autocast (or plain no_grad for fp32)."""
        stack = contextlib.ExitStack()
        stack.enter_context(torch.no_grad())
        if self.cfg.precision == "bf16":
            stack.enter_context(torch.autocast(self.device.type, dtype=torch.bfloat16))
        elif self.cfg.precision != "fp32":
            raise ValueError(f"precision must be bf16 or fp32, got {self.cfg.precision!r}")
        return stack

    def samples(self) -> Iterator[DecodedSample]:
        """The split's samples in shard order (decoded afresh on every call: memory stays flat
        on large splits; decoding is ~5 ms per COCO image, small next to the model)."""
        skips = SkipCounter()
        for i, s in enumerate(iter_shard_samples(self.shards, skip_counter=skips)):
            if self.cfg.max_images is not None and i >= self.cfg.max_images:
                break
            yield s
        self._cache["skips"] = skips

    def batches(self) -> Iterator[list[DecodedSample]]:
        batch: list[DecodedSample] = []
        for s in self.samples():
            batch.append(s)
            if len(batch) == self.cfg.batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, D) fp32 L2-normalised text embeddings, in batches."""
        out = []
        tok = self.model.tokenizer
        bs = max(64, self.cfg.batch_size)
        with self.autocast():
            for i in range(0, len(texts), bs):
                tokens = tok(list(texts[i : i + bs])).to(self.device)
                out.append(self.model.encode_text(tokens).float())
        return torch.nn.functional.normalize(torch.cat(out), dim=-1)

    def class_embeddings(self, names: Sequence[str]) -> torch.Tensor:
        """(C, D) prompt-ensemble classifier: each name through every template, averaged in
        embedding space and re-normalised (CLIP's zero-shot recipe). Cached per name list."""
        key = ("classes", tuple(names), tuple(self.cfg.templates))
        if key not in self._cache:
            t = len(self.cfg.templates)
            texts = [tpl.format(prompt_name(n)) for n in names for tpl in self.cfg.templates]
            emb = self.encode_texts(texts).reshape(len(names), t, -1).mean(dim=1)
            self._cache[key] = torch.nn.functional.normalize(emb, dim=-1)
        return self._cache[key]

    def image_pass(self) -> dict[str, Any]:
        """One pass of the image tower over the split with the model's own preprocessing:
        image embeddings, captions, caption->image index, thing labels per image. Cached."""
        if "image_pass" in self._cache:
            return self._cache["image_pass"]
        pre = self.model.preprocess_cfg
        thing_index = {cid: i for i, (cid, _) in enumerate(COCO_THINGS)}
        embs, captions, cap_to_img, labels, keys = [], [], [], [], []
        for batch in self.batches():
            x = torch.stack([prepare(s.image, pre).image for s in batch]).to(self.device)
            with self.autocast():
                embs.append(self.model.encode_image(x).float().cpu())
            for s in batch:
                idx = len(keys)
                keys.append(s.sample.key)
                caps = [c for c in s.sample.captions if c.strip()]
                captions.extend(caps)
                cap_to_img.extend([idx] * len(caps))
                row = torch.zeros(len(COCO_THINGS), dtype=torch.long)
                for r in s.sample.regions:
                    if r.category_id in thing_index:
                        row[thing_index[r.category_id]] = 1
                labels.append(row)
        if not keys:
            raise ValueError(f"no readable samples in {[str(p) for p in self.shards]}")
        out = {
            "image_emb": torch.nn.functional.normalize(torch.cat(embs), dim=-1),
            "captions": captions,
            "cap_to_img": torch.tensor(cap_to_img, dtype=torch.long),
            "thing_labels": torch.stack(labels),
            "keys": keys,
        }
        self._cache["image_pass"] = out
        return out


# ---------------------------------------------------------------------------------------------
# The four core groups
# ---------------------------------------------------------------------------------------------


@register_metric_group("retrieval")
def retrieval_group(ctx: EvalContext) -> dict[str, float]:
    """COCO-protocol R@1/5/10 both ways over all captions of the split."""
    p = ctx.image_pass()
    with_caps = torch.zeros(len(p["keys"]), dtype=torch.bool)
    with_caps[p["cap_to_img"]] = True
    if not bool(with_caps.all()):
        # An image without a caption cannot be an i2t query; keep it as a t2i distractor.
        log.warning("%d image(s) without captions are not i2t queries", int((~with_caps).sum()))
    text_emb = ctx.encode_texts(p["captions"])
    img = p["image_emb"]
    keep = torch.nonzero(with_caps).flatten()
    res = retrieval_recall(img, text_emb, p["cap_to_img"])
    if not bool(with_caps.all()):
        remap = torch.full((len(img),), -1, dtype=torch.long)
        remap[keep] = torch.arange(len(keep))
        i2t = retrieval_recall(img[keep], text_emb, remap[p["cap_to_img"]])
        res.update({k: v for k, v in i2t.items() if k.startswith("i2t_")})
        res["num_images"] = len(keep)
    return res


@register_metric_group("tagging")
def tagging_group(ctx: EvalContext) -> dict[str, float]:
    """Zero-shot multi-label mAP over the 80 COCO thing classes (prompt ensemble)."""
    p = ctx.image_pass()
    cls = ctx.class_embeddings([n for _, n in COCO_THINGS])
    return tagging_map(p["image_emb"] @ cls.T, p["thing_labels"])


def dense_preprocess(model: torch.nn.Module) -> Any:
    """The model's preprocessing with the whole image kept (resize longest side + pad): region
    and pixel tasks must see every box and pixel, which a centre crop would cut off."""
    import dataclasses

    return dataclasses.replace(model.preprocess_cfg, resize_mode="longest")


@register_metric_group("regions")
def regions_group(ctx: EvalContext) -> dict[str, float]:
    """Classify every non-crowd ground-truth thing box (encode_boxes) and mask (encode_masks)
    among the 80 thing classes; top-1/top-5 accuracy."""
    pre = dense_preprocess(ctx.model)
    cls = ctx.class_embeddings([n for _, n in COCO_THINGS])
    thing_index = {cid: i for i, (cid, _) in enumerate(COCO_THINGS)}
    box_scores, mask_scores, box_t, mask_t = [], [], [], []
    lost_boxes = lost_masks = 0
    for batch in ctx.batches():
        xs, boxes, masks, targets, mtargets = [], [], [], [], []
        for s in batch:
            regs = [r for r in s.sample.regions if not r.iscrowd and r.category_id in thing_index]
            b = torch.tensor([r.box for r in regs], dtype=torch.float32).reshape(-1, 4)
            t = torch.tensor([thing_index[r.category_id] for r in regs], dtype=torch.long)
            tb = prepare(s.image, pre, b)
            xs.append(tb.image)
            boxes.append(tb.boxes)
            targets.append(t[tb.keep])
            lost_boxes += len(regs) - len(tb.keep)
            # Masks separately: a mask too thin to survive resizing must not drop its box.
            with_mask = [i for i, r in enumerate(regs) if r.mask is not None]
            if with_mask:
                m = torch.stack([torch.from_numpy(decode_rle(regs[i].mask)) for i in with_mask])
                tm = prepare(s.image, pre, b[with_mask], m)
                masks.append(tm.masks)
                mtargets.append(t[with_mask][tm.keep])
                lost_masks += len(with_mask) - len(tm.keep)
            else:
                masks.append(None)
                mtargets.append(None)
        x = torch.stack(xs).to(ctx.device)
        with ctx.autocast():
            be = ctx.model.encode_boxes(x, [b.to(ctx.device) for b in boxes])
            # Images whose regions all have masks go through encode_masks together.
            mi = [i for i, m in enumerate(masks) if m is not None and len(m)]
            me = ctx.model.encode_masks(x[mi], [masks[i].to(ctx.device) for i in mi]) if mi else []
        for i, e in enumerate(be):
            if len(e):
                box_scores.append(e.float().cpu() @ cls.T)
                box_t.append(targets[i])
        for j, i in enumerate(mi):
            mask_scores.append(me[j].float().cpu() @ cls.T)
            mask_t.append(mtargets[i])
    if not box_scores:
        raise ValueError("the split has no non-crowd thing boxes to classify")
    bs, bt = torch.cat(box_scores), torch.cat(box_t)
    acc = topk_accuracy(bs, bt, ks=(1, 5))
    if lost_boxes or lost_masks:
        log.warning(
            "regions: %d box(es), %d mask(s) vanished in preprocessing", lost_boxes, lost_masks
        )
    out = {"box_top1": acc[1], "box_top5": acc[5], "num_boxes": len(bt)}
    if mask_scores:
        ms, mt = torch.cat(mask_scores), torch.cat(mask_t)
        out["mask_top1"] = topk_accuracy(ms, mt, ks=(1,))[1]
        out["num_masks"] = len(mt)
    else:
        out["mask_top1"] = float("nan")
        out["num_masks"] = 0
    return out


def predict_label_map(
    ctx: EvalContext, images: Sequence[Any], class_emb: torch.Tensor
) -> list[torch.Tensor]:
    """Zero-shot class map (H, W) at each original image's resolution from encode_dense."""
    pre = dense_preprocess(ctx.model)
    prepped = [prepare(im, pre) for im in images]
    x = torch.stack([p.image for p in prepped]).to(ctx.device)
    with ctx.autocast():
        dense = ctx.model.encode_dense(x).float().cpu()
    out = []
    for im, p, d in zip(images, prepped, dense, strict=True):
        lg = dense_logits(d, class_emb)
        box = content_box(p.geometry)
        out.append(logits_to_label_map(lg, tuple(x.shape[-2:]), box, (im.height, im.width)))
    return out


@register_metric_group("semseg")
def semseg_group(ctx: EvalContext) -> dict[str, float]:
    """Zero-shot semantic segmentation over the 133 COCO panoptic classes (images with a
    panoptic PNG only; unlabeled pixels ignored)."""
    cls = ctx.class_embeddings([n for _, n, _ in COCO_PANOPTIC])
    cat_index = {cid: i for i, (cid, _, _) in enumerate(COCO_PANOPTIC)}
    miou = MeanIoU(len(COCO_PANOPTIC))
    n = 0
    for batch in ctx.batches():
        pan = [s for s in batch if s.panoptic is not None and s.sample.panoptic]
        if not pan:
            continue
        preds = predict_label_map(ctx, [s.image for s in pan], cls)
        for s, pred in zip(pan, preds, strict=True):
            gt = panoptic_to_semantic(s.panoptic, s.sample.panoptic["segments"], cat_index)
            miou.update(pred, gt)
            n += 1
    if n == 0:
        return {"mIoU": float("nan"), "num_images": 0}
    res = miou.compute()
    return {
        "mIoU": res["mIoU"],
        "pixel_acc": res["pixel_acc"],
        "num_classes": res["num_classes"],
        "num_images": n,
    }


# ---------------------------------------------------------------------------------------------


def evaluate(
    model: torch.nn.Module,
    data_dir: str | Path,
    split: str = "val",
    cfg: EvalConfig | None = None,
) -> dict[str, float]:
    """Run the metric groups on ``split`` of the shards in ``data_dir``; flat ``group/key`` dict.

    A group that fails is logged and its keys are NaN, so one broken task never hides the
    others' figures; ``eval/failed_groups`` counts them.
    """
    cfg = cfg or EvalConfig()
    shards = list_shards(data_dir, split)
    was_training = model.training
    model.eval()
    ctx = EvalContext(model=model, shards=shards, cfg=cfg)
    names = list(cfg.groups) or list(METRIC_GROUPS)
    unknown = [n for n in names if n not in METRIC_GROUPS]
    if unknown:
        raise ValueError(f"unknown metric group(s) {unknown}; known: {sorted(METRIC_GROUPS)}")
    out: dict[str, float] = {}
    failed = 0
    try:
        for name in names:
            t0 = time.perf_counter()
            log.info("eval: %s ...", name)
            try:
                res = METRIC_GROUPS[name](ctx)
            except Exception:
                log.exception("eval: metric group %r failed", name)
                failed += 1
                res = {}
            for k, v in res.items():
                out[f"{name}/{k}"] = float(v)
            log.info("eval: %s done in %.1fs", name, time.perf_counter() - t0)
    finally:
        model.train(was_training)
    for k in CORE_KEYS:
        if k.split("/")[0] in names:
            out.setdefault(k, float("nan"))
    skips = ctx._cache.get("skips")
    out["eval/skipped_samples"] = float(skips.total if skips else 0)
    out["eval/failed_groups"] = float(failed)
    return out
