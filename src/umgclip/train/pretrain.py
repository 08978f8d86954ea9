"""Multi-task CLIP pre-training (UMG-CLIP): ``train(cfg) -> run_dir``.

One loop serves a laptop CPU and ``torchrun`` on many GPUs: the model (wrapped in DDP when there is
more than one process) encodes the images once (image + region embeddings from ``forward_train``)
and every text of the batch in one text-tower call (captions, region texts, tag prompts, each
distinct string once); :class:`umgclip.losses.UMGLoss` gathers them over ranks and computes the
global-batch loss. Run folder: ``config.yaml``, ``metrics.jsonl``, ``curves.png``,
``checkpoints/step_N/`` (model folder + ``train_state.pt``) and ``final/`` (model folder).
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import random
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP

from umgclip.config import save_config, to_dict
from umgclip.losses import TERMS, LossConfig, LossTargets, UMGLoss
from umgclip.train import checkpoint as ckpt_io
from umgclip.train.config import ModelSection, OptimConfig, PretrainConfig
from umgclip.train.data_stream import BatchStream
from umgclip.train.distributed import (
    DistInfo,
    all_reduce_sum,
    barrier,
    broadcast_object,
    init_distributed,
)
from umgclip.train.schedule import ScheduleLengthError, WarmupCosine

log = logging.getLogger(__name__)

# Parameter-name fragments that never get weight decay (besides every 0/1-d tensor).
_NO_DECAY = ("bias", "norm", "logit_scale", "embed", "cls_token", "class_embedding")


def import_object(spec: str) -> Any:
    """``"package.module:attr"`` -> the attribute."""
    mod, _, attr = spec.partition(":")
    if not mod or not attr:
        raise ValueError(f"expected 'package.module:function', got {spec!r}")
    return getattr(importlib.import_module(mod), attr)


# ------------------------------------------------------------------------------------ the model


def build_model(mcfg: ModelSection, device: torch.device) -> tuple[nn.Module, Any]:
    """Create the model named by the config (registry or ``factory``) -> (model, preprocess)."""
    if mcfg.factory:
        return import_object(mcfg.factory)(mcfg.name, mcfg.pretrained, str(device))
    from umgclip.model import registry

    overrides = list(mcfg.overrides)
    if mcfg.clustering_keep is not None:
        overrides.append(f"clustering.keep={mcfg.clustering_keep}")
    return registry.create_model_and_transforms(
        mcfg.name, pretrained=mcfg.pretrained, device=str(device), overrides=overrides
    )


def apply_freezing(model: nn.Module, frozen: list[str], unfrozen: list[str]) -> dict[str, int]:
    """Freeze parameters whose name starts with a ``frozen`` prefix, except ``unfrozen`` ones.

    A prefix that matches no parameter is an error: it is a typo that would silently train (or
    freeze) the wrong thing.
    """
    names = [n for n, _ in model.named_parameters()]
    for p in (*frozen, *unfrozen):
        if not any(n.startswith(p) for n in names):
            raise ValueError(f"model.frozen/unfrozen prefix {p!r} matches no parameter")
    counts = {"trainable": 0, "frozen": 0}
    for n, p in model.named_parameters():
        freeze = any(n.startswith(f) for f in frozen) and not any(n.startswith(u) for u in unfrozen)
        if freeze:
            p.requires_grad_(False)
        counts["frozen" if not p.requires_grad else "trainable"] += p.numel()
    return counts


def ensure_fp32_master(model: nn.Module) -> int:
    """Cast low-precision floating parameters to fp32 (C13): the optimizer updates fp32 master
    weights and bf16 lives only inside autocast. Returns how many tensors were cast."""
    n = 0
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()
            n += 1
    if n:
        log.warning("cast %d low-precision parameter tensors to fp32 master weights", n)
    return n


def param_groups(model: nn.Module, ocfg: OptimConfig) -> list[dict[str, Any]]:
    """AdamW groups per tower (image / text / heads) x (decay / no decay)."""
    lrs = {
        "image": ocfg.image_lr if ocfg.image_lr is not None else ocfg.lr,
        "text": ocfg.text_lr if ocfg.text_lr is not None else ocfg.lr,
        "head": ocfg.head_lr if ocfg.head_lr is not None else ocfg.lr,
    }
    buckets: dict[tuple[str, bool], list[Tensor]] = defaultdict(list)
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        tower = (
            "image"
            if n.startswith("image_tower.")
            else "text"
            if n.startswith("text_tower.")
            else "head"
        )
        decay = p.ndim >= 2 and not any(k in n.lower() for k in _NO_DECAY)
        buckets[(tower, decay)].append(p)
    groups = []
    for (tower, decay), params in sorted(buckets.items()):
        groups.append(
            {
                "params": params,
                "name": f"{tower}{'' if decay else '_no_decay'}",
                "lr": lrs[tower],
                "base_lr": lrs[tower],
                "weight_decay": ocfg.weight_decay if decay else 0.0,
            }
        )
    if not groups:
        raise ValueError("no trainable parameter: check model.frozen / model.unfrozen")
    return groups


def make_optimizer(model: nn.Module, ocfg: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    groups = param_groups(model, ocfg)
    kwargs: dict[str, Any] = {"betas": tuple(ocfg.betas), "eps": ocfg.eps}
    if ocfg.fused and device.type in ("cpu", "cuda"):
        kwargs["fused"] = True  # DESIGN 7: 4x faster steps on this CPU
    return torch.optim.AdamW(groups, **kwargs)


class PretrainModule(nn.Module):
    """Model + text encoding in one ``forward``, so DDP sees every parameter use in one call."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, images: Tensor, boxes: list[Tensor] | None, tokens: Tensor
    ) -> dict[str, Tensor]:
        out = dict(self.model.forward_train(images, boxes))
        out["texts"] = self.model.encode_text(tokens)
        out["logit_scale"] = self.model.logit_scale_value()
        return out


# ------------------------------------------------------------------------------------ the batch


def batch_texts(batch: Any, lcfg: LossConfig) -> tuple[list[str], LossTargets, bool]:
    """The texts to encode (captions, region texts, tag prompts) and the loss's string targets."""
    need_regions = lcfg.enabled("rtc") or lcfg.enabled("region_tag")
    need_tags = lcfg.enabled("image_tag") or lcfg.enabled("region_tag")
    region_texts = [t for per in batch.region_texts for t in per] if lcfg.enabled("rtc") else []
    region_tags = [t for per in batch.region_tags for t in per] if need_regions else []
    tags = [list(t) for t in batch.tags]
    vocab: list[str] = []
    if need_tags:
        seen = set()
        sources = (tags if lcfg.enabled("image_tag") else []) + (
            region_tags if lcfg.enabled("region_tag") else []
        )
        for per in sources:
            seen.update(per)
        vocab = sorted(seen)
    prompts = [lcfg.tag_prompt.format(t) for t in vocab]
    targets = LossTargets(
        captions=list(batch.captions),
        region_texts=region_texts,
        tags=tags,
        region_tags=region_tags,
        tag_vocab=vocab,
    )
    return list(batch.captions) + region_texts + prompts, targets, need_regions


def encode_unique(texts: list[str], tokenizer: Callable) -> tuple[Tensor, Tensor]:
    """Tokens of each distinct text once, and the index mapping every text to its row."""
    uniq: dict[str, int] = {}
    idx = [uniq.setdefault(t, len(uniq)) for t in texts]
    return tokenizer(list(uniq)), torch.tensor(idx, dtype=torch.long)


def forward_loss(
    module: nn.Module,
    batch: Any,
    loss_fn: UMGLoss,
    tokenizer: Callable,
    device: torch.device,
    bf16: bool,
) -> dict[str, Tensor]:
    """One micro-batch: encode, split the text embeddings, compute the losses."""
    texts, targets, need_regions = batch_texts(batch, loss_fn.cfg)
    tokens, idx = encode_unique(texts, tokenizer)
    images = batch.images.to(device, non_blocking=True)
    boxes = [b.to(device) for b in batch.boxes] if need_regions else None
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
        out = module(images, boxes, tokens.to(device))
        t = out.pop("texts").index_select(0, idx.to(device))
        b, r = len(targets.captions), len(targets.region_texts)
        out["text"], out["region_text"], out["tag_text"] = t[:b], t[b : b + r], t[b + r :]
        if out.get("regions") is None:
            out["regions"] = out["image"][:0]
        valid = out.get("region_valid")
        if valid is not None and need_regions and not bool(valid.all()):
            # The model dropped invalid boxes: keep the texts and tags of the regions it kept.
            keep = valid.nonzero().squeeze(1)
            if r:
                out["region_text"] = out["region_text"].index_select(0, keep)
                targets.region_texts = [targets.region_texts[i] for i in keep.tolist()]
            if targets.region_tags:
                targets.region_tags = [targets.region_tags[i] for i in keep.tolist()]
        return loss_fn(out, targets)


# ---------------------------------------------------------------------------------- the loader


def make_loader(cfg: PretrainConfig, preprocess: Any, dinfo: DistInfo) -> Iterable[Any]:
    """This rank's training loader (the data layer shards by rank; iterating yields an epoch)."""
    if cfg.data_factory:
        build = import_object(cfg.data_factory)
    else:
        from umgclip.data.loader import build_loader as build
    return build(cfg.data, preprocess, train=True, rank=dinfo.rank, world_size=dinfo.world_size)


def total_steps(cfg: PretrainConfig, loader: Iterable[Any]) -> int:
    """Optimizer steps of the run: ``schedule.steps`` or ``epochs`` x batches per epoch."""
    if cfg.schedule.steps > 0:
        return cfg.schedule.steps
    if cfg.schedule.epochs <= 0:
        raise ValueError("set schedule.steps or schedule.epochs (> 0)")
    try:
        n = len(loader)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(
            "schedule.epochs needs a loader with a length; set schedule.steps instead"
        ) from None
    return max(1, math.ceil(cfg.schedule.epochs * n / cfg.optim.accum_steps))


# ------------------------------------------------------------------------------------- metrics


class MetricsWriter:
    """``metrics.jsonl`` (one JSON object per logged step) and ``curves.png``."""

    def __init__(self, run_dir: Path, enabled: bool, resume_step: int = 0) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.png = run_dir / "curves.png"
        self.enabled = enabled
        if enabled and self.path.exists():
            # Drop lines past the resume point: they belong to the part of the run being redone.
            keep = [
                ln
                for ln in self.path.read_text().splitlines()
                if ln.strip() and json.loads(ln).get("step", 0) <= resume_step
            ]
            self.path.write_text("".join(ln + "\n" for ln in keep))

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def plot(self) -> None:
        if self.enabled and self.path.exists():
            plot_curves(self.path, self.png)


def plot_curves(metrics: Path, out: Path) -> None:
    """One panel per loss term (and the total) over steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(ln) for ln in metrics.read_text().splitlines() if ln.strip()]
    keys = [k for k in ("loss", *TERMS) if any(k in r for r in rows)]
    if not keys:
        return
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.8), squeeze=False)
    for ax, k in zip(axes[0], keys):
        pts = [(r["step"], r[k]) for r in rows if k in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", lw=1)
        ax.set_title(k)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)


# -------------------------------------------------------------------------------------- train


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _gather_rng(dinfo: DistInfo) -> list[dict[str, Any]]:
    state = ckpt_io.rng_state()
    if not dinfo.distributed:
        return [state]
    import torch.distributed as dist

    out: list[Any] = [None] * dinfo.world_size
    dist.all_gather_object(out, state)
    return out


def train(cfg: PretrainConfig, resume: str | None = None) -> Path:
    """Run (or resume) pre-training; returns the run folder.

    ``resume``: None (fresh run; refuses a run folder that already has checkpoints), ``"latest"``
    (the run folder's newest checkpoint) or a checkpoint / run-folder path.
    """
    dinfo = init_distributed(cfg.device)
    device = dinfo.device
    run_dir = Path(cfg.output_dir)
    if dinfo.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = ckpt_io.resolve_resume(resume, run_dir) if dinfo.is_main else None
    if dinfo.is_main and ckpt_path is None and ckpt_io.latest_checkpoint(run_dir) is not None:
        raise FileExistsError(
            f"{run_dir} already has checkpoints: pass --resume to continue it, or choose another "
            "output_dir"
        )
    ckpt_path = broadcast_object(ckpt_path)
    seed_everything(cfg.seed)

    model, preprocess = build_model(cfg.model, device)
    model.to(device)
    if cfg.model.clustering is not None and hasattr(model, "set_token_clustering"):
        model.set_token_clustering(cfg.model.clustering)
    ensure_fp32_master(model)
    counts = apply_freezing(model, cfg.model.frozen, cfg.model.unfrozen)
    log.info("parameters: %(trainable)d trainable, %(frozen)d frozen", counts)
    tokenizer = model.tokenizer
    preprocess_cfg = getattr(model, "preprocess_cfg", preprocess)
    loader = make_loader(cfg, preprocess_cfg, dinfo)
    n_total = total_steps(cfg, loader)
    warmup = cfg.schedule.warmup_steps or int(cfg.schedule.warmup_fraction * n_total)
    sched = WarmupCosine(n_total, min(warmup, n_total - 1), cfg.schedule.min_lr_ratio)
    optimizer = make_optimizer(model, cfg.optim, device)
    stream = BatchStream(loader)
    loss_fn = UMGLoss(cfg.loss)

    step, skipped_samples = 0, 0
    term_skips: dict[str, int] = defaultdict(int)
    if ckpt_path is not None:
        state = ckpt_io.load_train_state(ckpt_path)
        ckpt_io.load_model_weights(model, ckpt_path)
        optimizer.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["schedule"])
        step = int(state["step"])
        if sched.total != n_total:
            if not cfg.schedule.allow_length_change:
                raise ScheduleLengthError(
                    f"the checkpoint's schedule has {sched.total} steps, this config {n_total}: "
                    "set schedule.allow_length_change=true to re-derive the cosine from step "
                    f"{step} (no LR jump), or restore the original length"
                )
            sched.rebase(step, n_total)
            log.info("schedule re-derived from step %d to %d steps", step, n_total)
        skipped_samples = int(state.get("skipped_samples", 0))
        term_skips.update(state.get("term_skips", {}))
        stream.load_state_dict(state["data"])
        # Restore RNG last: fast-forwarding the data above may have consumed random numbers.
        rngs = state["rng"]
        if len(rngs) != dinfo.world_size:
            log.warning(
                "resuming on %d processes from %d: RNG streams differ", dinfo.world_size, len(rngs)
            )
        ckpt_io.set_rng_state(rngs[dinfo.rank % len(rngs)])
        log.info("resumed from %s at step %d", ckpt_path, step)
    if dinfo.is_main:
        save_config(cfg, run_dir / "config.yaml")

    module: nn.Module = PretrainModule(model)
    if dinfo.distributed:
        module = DDP(
            module,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=cfg.find_unused_parameters,
        )
    module.train()
    metrics = MetricsWriter(run_dir, dinfo.is_main, resume_step=step)
    trainable = [p for p in model.parameters() if p.requires_grad]

    def save_checkpoint(at_step: int) -> None:
        # Reads the loop's current skip counts when called (a closure, not a snapshot).
        _checkpoint(
            cfg, run_dir, dinfo, model, optimizer, sched, stream, at_step,
            skipped_samples, term_skips, metrics,
        )  # fmt: skip

    bar = None
    if dinfo.is_main and cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_total, initial=step, desc="train", dynamic_ncols=True)

    window_t, window_n = time.perf_counter(), 0
    while step < n_total:
        lr_factor = sched.apply(optimizer, step)
        optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = defaultdict(float)
        for micro in range(cfg.optim.accum_steps):
            batch = next(stream)
            skipped_samples += int(getattr(batch, "skipped", 0) or 0)
            last = micro == cfg.optim.accum_steps - 1
            sync = module.no_sync() if (dinfo.distributed and not last) else _nullcontext()
            with sync:
                res = forward_loss(module, batch, loss_fn, tokenizer, device, cfg.bf16)
                (res["loss"] / cfg.optim.accum_steps).backward()
            for k, v in res.items():
                sums[k] += float(v.detach()) / cfg.optim.accum_steps
            for k in loss_fn.last_skipped:
                term_skips[k] += 1
            window_n += len(batch.captions) * dinfo.world_size
        if not math.isfinite(sums["loss"]):
            raise FloatingPointError(f"non-finite loss at step {step}: {dict(sums)}")
        grad_norm = (
            float(torch.nn.utils.clip_grad_norm_(trainable, cfg.optim.grad_clip))
            if cfg.optim.grad_clip > 0
            else float("nan")
        )
        optimizer.step()
        if hasattr(model, "clamp_logit_scale_"):
            model.clamp_logit_scale_()
        step += 1

        if step % max(1, cfg.log_every) == 0 or step == n_total or step == 1:
            dt = time.perf_counter() - window_t
            record: dict[str, Any] = {"step": step, **{k: round(v, 6) for k, v in sums.items()}}
            record["lr"] = {g["name"]: g["lr"] for g in optimizer.param_groups}
            record["lr_factor"] = lr_factor
            record["grad_norm"] = grad_norm
            record["logit_scale"] = float(model.logit_scale_value().detach())
            record["samples_per_s"] = round(window_n / max(dt, 1e-9), 2)
            record["skipped_samples"] = int(all_reduce_sum(skipped_samples, device))
            record["skipped_terms"] = dict(term_skips)
            record["epoch"] = stream.epoch
            metrics.write(record)
            window_t, window_n = time.perf_counter(), 0
            if bar is not None:
                post = {k: f"{sums[k]:.3f}" for k in ("loss", *TERMS) if k in sums}
                post["lr"] = f"{optimizer.param_groups[0]['lr']:.2e}"
                post["img/s"] = f"{record['samples_per_s']:.1f}"
                bar.set_postfix(post, refresh=False)
        if bar is not None:
            bar.update(1)
        if cfg.checkpoint_every > 0 and step % cfg.checkpoint_every == 0 and step < n_total:
            save_checkpoint(step)

    if bar is not None:
        bar.close()
    save_checkpoint(step)
    if dinfo.is_main:
        final = run_dir / "final"
        tmp = run_dir / ".final.tmp"
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        log.info(
            "done: %d steps, %d samples skipped by the data layer, term skips %s -> %s",
            step,
            skipped_samples,
            dict(term_skips),
            final,
        )
    barrier()
    return run_dir


def _checkpoint(
    cfg, run_dir, dinfo, model, optimizer, sched, stream, step, skipped, term_skips, metrics
) -> None:
    rngs = _gather_rng(dinfo)  # collective: every rank calls it
    if dinfo.is_main:
        state = {
            "step": step,
            "optimizer": optimizer.state_dict(),
            "schedule": sched.state_dict(),
            "rng": rngs,
            "data": stream.state_dict(),
            "skipped_samples": skipped,
            "term_skips": dict(term_skips),
            "world_size": dinfo.world_size,
            "config": json.dumps(to_dict(cfg), default=str),
        }
        ckpt_io.save_checkpoint(run_dir, step, model, state, cfg.keep_last)
        metrics.plot()
    barrier()


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
