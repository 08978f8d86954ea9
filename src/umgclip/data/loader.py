"""Batches for training and evaluation: shards -> shuffled, transformed samples -> :class:`Batch`.

Determinism and resume (C25): the order of samples depends only on ``(seed, epoch)``, and the
augmentation and caption choice of a sample only on ``(seed, epoch, key)``. A position is
``(epoch, batches consumed)``; resuming re-reads the same stream and fast-forwards over the
consumed samples *before* decoding them, so the resumed run sees exactly the batches the
uninterrupted run would have seen.

Parallel reading: the stream is split over ``world_size x num_workers`` readers. With at least
that many shards, reader ``i`` reads shards ``i, i + n, ...``; with fewer shards (C22) every
reader reads all shards and keeps samples whose index modulo ``n`` is ``i``, after a warning.
"""

from __future__ import annotations

import logging
import random
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.filters import _shuffle

from umgclip.config import PreprocessConfig
from umgclip.data.masks import decode_masks
from umgclip.data.shards import (
    RawSample,
    ReadKeys,
    SkipCounter,
    decode_stream,
    iter_raw_samples,
    list_shards,
)
from umgclip.data.transforms import AugmentConfig, Geometry, RegionTransform

log = logging.getLogger(__name__)


@dataclass
class DataConfig:
    """Where the shards are and how batches are made.

    ``masks``: load region masks into ``Batch.masks`` (slower; needed for mask pooling).
    ``region_kinds``: which regions become batch regions. ``caption``: ``random`` (seeded per
    sample and epoch) or ``first``. ``min_visible``: regions with less of their box left
    after cropping are dropped. ``require_caption``: skip (and count) samples with no
    non-empty caption; empty captions are always removed (C07).
    """

    shards: str = ""
    split: str | None = "train"
    batch_size: int = 32
    workers: int = 0
    shuffle_buffer: int = 1000
    seed: int = 0
    max_regions: int = 32
    min_visible: float = 0.25
    masks: bool = False
    region_kinds: list[str] = field(default_factory=lambda: ["thing", "stuff"])
    include_crowd: bool = False
    caption: str = "random"
    require_caption: bool = True
    drop_last: bool = False
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    keys: ReadKeys = field(default_factory=ReadKeys)

    def __post_init__(self) -> None:
        if self.caption not in ("random", "first"):
            raise ValueError(f"caption must be 'random' or 'first', got {self.caption!r}")
        if self.batch_size < 1 or self.workers < 0 or self.max_regions < 0:
            raise ValueError("batch_size must be >= 1, workers and max_regions >= 0")
        if not 0.0 <= self.min_visible <= 1.0:
            raise ValueError(f"min_visible must be in [0, 1], got {self.min_visible}")
        bad = set(self.region_kinds) - {"thing", "stuff"}
        if bad:
            raise ValueError(f"region_kinds may contain 'thing' and 'stuff', got {sorted(bad)}")


@dataclass
class Item:
    """One processed sample (what the dataset yields, before collation)."""

    key: str
    image: torch.Tensor
    caption: str
    all_captions: list[str]
    tags: list[str]
    boxes: torch.Tensor
    region_tags: list[list[str]]
    region_texts: list[str]
    masks: torch.Tensor | None
    geometry: Geometry
    skipped: int = 0
    dropped_regions: int = 0
    empty_captions: int = 0


@dataclass
class Batch:
    """A collated batch (field contract in docs/architecture.md).

    ``boxes[i]`` are xyxy pixels of ``images[i]``; ``geometries[i]`` maps them back to the
    original image. ``skipped`` counts samples dropped by this batch's reader since its previous
    batch (bad images, no caption, ...), ``dropped_regions`` regions cut away by cropping or
    ``max_regions``, ``empty_captions`` empty caption strings removed (C07).
    """

    images: torch.Tensor
    keys: list[str]
    captions: list[str]
    all_captions: list[list[str]]
    tags: list[list[str]]
    boxes: list[torch.Tensor]
    region_tags: list[list[list[str]]]
    region_texts: list[list[str]]
    masks: list[torch.Tensor] | None
    skipped: int = 0
    geometries: list[Geometry] = field(default_factory=list)
    dropped_regions: int = 0
    empty_captions: int = 0

    def __len__(self) -> int:
        return len(self.keys)

    def to(self, device: str | torch.device, non_blocking: bool = False) -> Batch:
        """Move tensors to ``device`` (lists of strings stay)."""
        return Batch(
            images=self.images.to(device, non_blocking=non_blocking),
            keys=self.keys,
            captions=self.captions,
            all_captions=self.all_captions,
            tags=self.tags,
            boxes=[b.to(device, non_blocking=non_blocking) for b in self.boxes],
            region_tags=self.region_tags,
            region_texts=self.region_texts,
            masks=None
            if self.masks is None
            else [m.to(device, non_blocking=non_blocking) for m in self.masks],
            skipped=self.skipped,
            geometries=self.geometries,
            dropped_regions=self.dropped_regions,
            empty_captions=self.empty_captions,
        )


def region_text(caption: str | None, tags: list[str]) -> str:
    """The text a region is aligned with: its caption, else ``"a photo of a {first tag}."``."""
    if caption and caption.strip():
        return caption.strip()
    return f"a photo of a {tags[0]}." if tags else ""


def collate_batch(items: list[Item]) -> Batch:
    """Stack images; keep per-image variable-length regions as lists."""
    if not items:
        raise ValueError("cannot collate an empty batch")
    has_masks = items[0].masks is not None
    return Batch(
        images=torch.stack([it.image for it in items]),
        keys=[it.key for it in items],
        captions=[it.caption for it in items],
        all_captions=[it.all_captions for it in items],
        tags=[it.tags for it in items],
        boxes=[it.boxes for it in items],
        region_tags=[it.region_tags for it in items],
        region_texts=[it.region_texts for it in items],
        masks=[it.masks for it in items] if has_masks else None,  # type: ignore[misc]
        skipped=sum(it.skipped for it in items),
        geometries=[it.geometry for it in items],
        dropped_regions=sum(it.dropped_regions for it in items),
        empty_captions=sum(it.empty_captions for it in items),
    )


def _sample_rng(seed: int, epoch: int, key: str) -> random.Random:
    return random.Random((seed * 1_000_003 + epoch) * 2**32 + zlib.crc32(key.encode()))


class ShardDataset(IterableDataset):
    """Seeded, resumable, worker- and rank-aware stream of :class:`Item` from shards."""

    def __init__(
        self,
        cfg: DataConfig,
        transform: RegionTransform,
        train: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.transform = transform
        self.train = train
        self.rank, self.world_size = rank, world_size
        self.paths = [str(p) for p in list_shards(cfg.shards, cfg.split)]
        self.epoch = 0
        self.skip_samples = 0  # samples this rank already consumed in `epoch` (all workers)
        self._skip_batches = 0
        self._num_workers = max(1, cfg.workers)
        n_readers = self.world_size * self._num_workers
        self.split_by_sample = len(self.paths) < n_readers
        if self.split_by_sample and n_readers > 1:
            warnings.warn(
                f"{len(self.paths)} shard(s) for {self.world_size} rank(s) x {self._num_workers} "
                f"worker(s): every reader scans all shards and keeps every {n_readers}th sample "
                f"(correct and balanced, but each reader reads all bytes; write more shards)",
                stacklevel=2,
            )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def set_position(self, epoch: int, batches_consumed: int) -> None:
        """Start the next iteration at ``epoch`` after ``batches_consumed`` batches of this rank."""
        self.epoch = epoch
        self._skip_batches = batches_consumed

    # -- the stream ---------------------------------------------------------------------------

    def _reader(self) -> tuple[int, int, int, int]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.rank * nw + wid, self.world_size * nw, wid, nw

    def _raw_stream(self, reader: int, n_readers: int, skips: SkipCounter) -> Iterator[RawSample]:
        paths = list(self.paths)
        if self.train and self.cfg.shuffle_buffer > 0:
            random.Random(self.cfg.seed * 7919 + self.epoch).shuffle(paths)
        if self.split_by_sample:
            stream = (
                r for i, r in enumerate(iter_raw_samples(paths, skips)) if i % n_readers == reader
            )
        else:
            stream = iter_raw_samples(paths[reader::n_readers], skips)
        if self.train and self.cfg.shuffle_buffer > 1:
            rng = random.Random((self.cfg.seed * 1_000_003 + self.epoch) * 4099 + reader)
            stream = _shuffle(
                stream, bufsize=self.cfg.shuffle_buffer, initial=self.cfg.shuffle_buffer, rng=rng
            )
        return stream

    def __iter__(self) -> Iterator[Item]:
        reader, n_readers, wid, nw = self._reader()
        # DataLoader hands out worker batches round-robin, so worker `wid` produced
        # ceil((B - wid) / nw) of the B batches consumed so far.
        b = self._skip_batches
        to_skip = max(0, (b - wid + nw - 1) // nw) * self.cfg.batch_size
        skips = SkipCounter()
        raws = self._raw_stream(reader, n_readers, skips)
        last_total = 0
        decoded = decode_stream(raws, self.cfg.keys, skips)
        produced = 0
        for d in decoded:
            item = self._process(d, skips)
            if item is None:
                continue
            if produced < to_skip:
                produced += 1
                continue
            produced += 1
            item.skipped = skips.total - last_total
            last_total = skips.total
            yield item
        if skips.total:
            log.info("reader %d/%d, epoch %d: %s", reader, n_readers, self.epoch, skips.summary())

    def _process(self, d: Any, skips: SkipCounter) -> Item | None:
        s = d.sample
        cfg = self.cfg
        captions = [c.strip() for c in s.captions if c and c.strip()]
        n_empty = len(s.captions) - len(captions)
        if not captions and cfg.require_caption:
            skips.add("no_caption", s.key)
            return None
        rng = _sample_rng(cfg.seed, self.epoch, s.key)
        regions = [
            r
            for r in s.regions
            if r.kind in cfg.region_kinds and (cfg.include_crowd or not r.iscrowd)
        ]
        boxes = torch.tensor([r.box for r in regions], dtype=torch.float32).reshape(-1, 4)
        t = self.transform(d.image, boxes, None, rng=rng, min_visible=cfg.min_visible)
        keep = t.keep.tolist()
        out_boxes = t.boxes
        if len(keep) > cfg.max_regions:
            # Keep the largest visible regions: tiny ones carry the least signal per RoI.
            area = (out_boxes[:, 2] - out_boxes[:, 0]) * (out_boxes[:, 3] - out_boxes[:, 1])
            top = torch.argsort(area, descending=True, stable=True)[: cfg.max_regions].sort().values
            keep = [keep[i] for i in top.tolist()]
            out_boxes = out_boxes[top]
        out_masks = None
        if cfg.masks:
            # Decode only the regions that survived cropping and max_regions (the costly part).
            sel = [regions[i] for i in keep]
            full = decode_masks([r.mask for r in sel], s.height, s.width, boxes[keep])
            out_masks = self.transform.transform_masks(full, t.geometry)
            nonempty = out_masks.flatten(1).any(1)
            if not bool(nonempty.all()):
                keep = [k for k, ok in zip(keep, nonempty.tolist()) if ok]
                out_boxes, out_masks = out_boxes[nonempty], out_masks[nonempty]
        kept = [regions[i] for i in keep]
        if cfg.caption == "first" or not captions:
            caption = captions[0] if captions else ""
        else:
            caption = captions[rng.randrange(len(captions))]
        return Item(
            key=s.key,
            image=t.image,
            caption=caption,
            all_captions=captions,
            tags=list(s.tags),
            boxes=out_boxes,
            region_tags=[list(r.tags) for r in kept],
            region_texts=[region_text(r.caption, r.tags) for r in kept],
            masks=out_masks,
            geometry=t.geometry,
            dropped_regions=len(regions) - len(kept),
            empty_captions=n_empty,
        )


class ShardLoader:
    """A DataLoader over :class:`ShardDataset` that tracks its position for exact resume.

    Iterating yields one epoch; ``state_dict()`` is ``{"epoch", "batches", "samples"}`` of this
    rank, ``load_state_dict`` makes the next iteration continue from there.
    """

    def __init__(self, dataset: ShardDataset, cfg: DataConfig) -> None:
        self.dataset = dataset
        self.cfg = cfg
        self.epoch = 0
        self.batches = 0

    def __iter__(self) -> Iterator[Batch]:
        self.dataset.set_position(self.epoch, self.batches)
        dl = DataLoader(
            self.dataset,
            batch_size=self.cfg.batch_size,
            num_workers=self.cfg.workers,
            collate_fn=collate_batch,
            drop_last=self.cfg.drop_last,
            persistent_workers=False,
        )
        for batch in dl:
            self.batches += 1
            yield batch
        self.epoch += 1
        self.batches = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.batches = epoch, 0

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.epoch,
            "batches": self.batches,
            "samples": self.batches * self.cfg.batch_size,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch = int(state["epoch"])
        self.batches = int(state["batches"])


def build_loader(
    cfg: DataConfig,
    preprocess: PreprocessConfig,
    train: bool = True,
    rank: int | None = None,
    world_size: int | None = None,
) -> ShardLoader:
    """Loader over ``cfg.shards`` (split ``cfg.split``); ``train`` enables shuffling and
    augmentation. Rank and world size default to torch.distributed's when initialised."""
    from umgclip.data.transforms import build_eval_transform, build_train_transform

    if not cfg.shards:
        raise ValueError("DataConfig.shards is empty: give a shard folder or glob")
    if not Path(cfg.shards).exists() and not any(ch in cfg.shards for ch in "*?["):
        raise FileNotFoundError(f"shard folder not found: {cfg.shards}")
    if rank is None or world_size is None:
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            rank, world_size = dist.get_rank(), dist.get_world_size()
        else:
            rank, world_size = 0, 1
    transform = (
        build_train_transform(preprocess, cfg.augment)
        if train
        else build_eval_transform(preprocess)
    )
    ds = ShardDataset(cfg, transform, train=train, rank=rank, world_size=world_size)
    return ShardLoader(ds, cfg)
