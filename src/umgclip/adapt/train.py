"""``adapt(cfg)``: train adapters + a task decoder on a frozen backbone, evaluate on val, save.

Run folder: ``config.yaml``, ``metrics.jsonl`` (training losses), ``metrics.json`` (val),
``adapted/`` (adapter + decoder weights and the backbone reference; see
:func:`umgclip.adapt.model.load_adapted`). A backbone given by registry name is saved once
under ``backbone/`` so the reference points at real, hashed weights.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from pathlib import Path

import torch

from umgclip.adapt.config import AdaptConfig
from umgclip.adapt.data import ClassVocab, PanopticItem, load_items
from umgclip.adapt.evaluate import evaluate_adapted
from umgclip.adapt.model import AdaptedModel, class_embeddings
from umgclip.config import save_config
from umgclip.data.shards import SkipCounter
from umgclip.model.decoders.panoptic import PanopticTarget, panoptic_loss
from umgclip.model.decoders.semantic import semantic_loss

log = logging.getLogger(__name__)


def resolve_shards(source: str, cache_dir: Path) -> Path:
    """A folder of imported shards: ``source`` if it holds shards, else import the COCO-layout
    root ``source`` (empty: the shipped coco_mg) once into ``cache_dir``."""
    src = Path(source) if source else None
    if src is not None and src.is_dir() and any(src.glob("*.tar")):
        return src
    if src is None:
        from umgclip.paths import find_coco_mg

        src = find_coco_mg()
        if src is None:
            raise FileNotFoundError("no data: set data.source or UMGCLIP_DATA (see README)")
    if not (src / "annotations").is_dir():
        raise FileNotFoundError(f"data.source {src} holds neither shards nor a COCO layout")
    if not (cache_dir / "index.json").is_file():
        from umgclip.data.coco import import_coco

        log.info("adapt: importing %s into %s", src, cache_dir)
        import_coco(src, cache_dir)
    return cache_dir


def load_backbone(name_or_dir: str, run_dir: Path, device: str) -> tuple[torch.nn.Module, Path]:
    """(model, checkpoint folder). A registry name is created and saved under run_dir/backbone."""
    import umgclip

    p = Path(name_or_dir)
    if ("/" in name_or_dir or p.exists()) and not (p / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"backbone checkpoint {p} not found (no model.safetensors): run `make demo` to train "
            f"it, or pass another one with --set backbone=DIR (or a registry name, e.g. umg-lite)"
        )
    if (p / "model.safetensors").is_file():
        model = umgclip.load_model(p)
        return model.to(device).eval(), p
    model = umgclip.create_model(name_or_dir)
    out = run_dir / "backbone"
    model.save_pretrained(out)
    return model.to(device).eval(), out


def _targets(
    batch: list[PanopticItem], holdout: set[int], flip: list[bool]
) -> list[PanopticTarget]:
    out = []
    for it, f in zip(batch, flip):
        seg = it.segments.flip(-1) if f else it.segments
        keep = [i for i, c in enumerate(it.labels) if c not in holdout]
        masks = (
            torch.stack([seg == i + 1 for i in keep])
            if keep
            else torch.zeros(0, *seg.shape, dtype=torch.bool)
        )
        out.append(
            PanopticTarget(torch.tensor([it.labels[i] for i in keep], dtype=torch.long), masks)
        )
    return out


def _lr_at(step: int, cfg) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * t))


def train_steps(
    model: AdaptedModel, items: list[PanopticItem], cfg: AdaptConfig, log_file=None
) -> list[float]:
    """The optimisation loop (bf16 autocast, fused AdamW on adapter + decoder parameters)."""
    tc = cfg.train
    dev = model.class_emb.device
    params = model.trainable_parameters()
    fused = dev.type in ("cpu", "cuda")
    opt = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay, fused=fused)
    holdout = {i for i, s in enumerate(model.vocab.seen) if not s}
    rng = random.Random(tc.seed)
    order: list[int] = []
    losses: list[float] = []
    model.train()
    t0 = time.perf_counter()
    for step in range(tc.steps):
        if len(order) < tc.batch_size:
            order += rng.sample(range(len(items)), len(items))
        idx, order = order[: tc.batch_size], order[tc.batch_size :]
        batch = [items[i] for i in idx]
        flip = [rng.random() < 0.5 for _ in batch]
        x = torch.stack([it.image.flip(-1) if f else it.image for it, f in zip(batch, flip)]).to(
            dev
        )
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, tc)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=tc.precision == "bf16"):
            out = model(x)
        if cfg.task == "semseg":
            y = torch.stack(
                [it.semantic.flip(-1) if f else it.semantic for it, f in zip(batch, flip)]
            )
            if holdout:
                y = torch.where(torch.isin(y, torch.tensor(sorted(holdout))), 255, y)
            parts = {"loss": semantic_loss(out, y.to(dev))}
        else:
            lc = cfg.loss
            parts = panoptic_loss(out, [PanopticTarget(t.labels.to(dev), t.masks.to(dev)) for t in _targets(batch, holdout, flip)],
                                  lc.ce, lc.mask, lc.dice, lc.no_object)  # fmt: skip
        loss = parts["loss"]
        if not torch.isfinite(loss):
            raise FloatingPointError(f"adapt: non-finite loss at step {step}: {float(loss)}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if log_file is not None and (step % tc.log_every == 0 or step == tc.steps - 1):
            rec = {
                "step": step,
                "lr": _lr_at(step, tc),
                "time_s": round(time.perf_counter() - t0, 2),
            }
            rec.update({k: float(v.detach()) for k, v in parts.items()})
            log_file.write(json.dumps(rec) + "\n")
            log_file.flush()
            log.info("adapt step %d/%d loss %.4f", step, tc.steps, losses[-1])
    return losses


def adapt(cfg: AdaptConfig) -> Path:
    """Run one adaptation (see module doc); returns the run folder."""
    tc = cfg.train
    if tc.threads:
        torch.set_num_threads(tc.threads)
    torch.manual_seed(tc.seed)
    run = Path(cfg.out_dir)
    run.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run / "config.yaml")
    shards = resolve_shards(cfg.data.source, run.parent / "_adapt_shards")
    backbone, backbone_dir = load_backbone(cfg.backbone, run, tc.device)
    vocab = ClassVocab.coco_panoptic(cfg.data.holdout_classes)
    dev = torch.device(tc.device)
    class_emb = class_embeddings(backbone, vocab.names, dev)
    model = AdaptedModel(backbone, cfg, vocab, class_emb)
    counts = model.param_counts()
    log.info("adapt: %s; decoder %s params; trainable %.2f%% of %s", model.adapter_info,
             f"{counts['decoder']:,}", 100 * counts["trainable"] / counts["total"], f"{counts['total']:,}")  # fmt: skip
    pre = backbone.preprocess_cfg
    skips = SkipCounter()
    train_items = load_items(
        shards, "train", vocab, cfg.data.size, pre.mean, pre.std, cfg.data.max_train, skips
    )
    val_items = load_items(
        shards, "val", vocab, cfg.data.size, pre.mean, pre.std, cfg.data.max_val, skips
    )
    if not train_items or not val_items:
        raise ValueError(
            f"need panoptic images in train and val, got {len(train_items)}/{len(val_items)}"
        )
    log.info("adapt: %d train / %d val panoptic images", len(train_items), len(val_items))
    t0 = time.perf_counter()
    with open(run / "metrics.jsonl", "w") as f:
        train_steps(model, train_items, cfg, f)
    train_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    metrics = evaluate_adapted(model, val_items, tc.batch_size, tc.precision)
    metrics.update({
        "train_seconds": round(train_s, 1),
        "eval_seconds": round(time.perf_counter() - t1, 1),
        "num_train_images": len(train_items),
        "skipped_samples": skips.total,
        **{f"params/{k}": v for k, v in counts.items()},
        "params/trainable_fraction": counts["trainable"] / counts["total"],
    })  # fmt: skip
    model.save(run / "adapted", backbone_dir)
    (run / "metrics.json").write_text(json.dumps(metrics, indent=1))
    log.info(
        "adapt: val %s",
        {k: round(v, 4) for k, v in metrics.items() if "/" in k and "params" not in k},
    )
    return run
