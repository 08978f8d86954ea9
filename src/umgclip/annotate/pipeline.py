"""The annotation pipeline: read images or shards, run the configured annotators in stages,
filter, and write our shard format + ``summary.json``; resumable, with a local and a Ray executor.

Work unit and resumption: inputs are numbered in a deterministic order (sorted files / shard
order) and cut into chunks of ``shard_size``; chunk ``c`` becomes one shard
``{prefix}-{c:06d}-000000.tar`` written atomically (``ShardWriter``: tmp + rename), then
``manifest.json`` records the chunk (atomically: tmp + ``os.replace``). A restarted run skips
recorded chunks and rewrites any shard of an unrecorded one, so nothing is lost or duplicated.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from umgclip.annotate.annotators import Detections
from umgclip.annotate.backends import build_annotator
from umgclip.annotate.config import AnnotateConfig
from umgclip.annotate.filters import RULES, filter_boxes, filter_masks, filter_scores
from umgclip.annotate.vocab import load_vocabulary
from umgclip.config import to_dict
from umgclip.data.images import ImageDecodeError
from umgclip.data.masks import encode_mask
from umgclip.data.schema import Region, Sample, SchemaError
from umgclip.data.shards import (
    RawSample,
    ReadKeys,
    ShardWriter,
    decode_raw,
    iter_raw_samples,
    list_shards,
)

log = logging.getLogger(__name__)

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
#: Stage order; each stage is one annotator slot (Ray runs one actor pool per stage).
STAGES: tuple[str, ...] = (
    "tagger",
    "captioner",
    "detector",
    "region_labeller",
    "masker",
    "region_captioner",
    "scorer",
)


# ------------------------------------------------------------------------------------ inputs
def _folder_key(rel: Path) -> str:
    return str(rel.with_suffix("")).replace("/", "_").replace(".", "_") or "unnamed"


def iter_inputs(path: str | Path, split: str | None = None) -> Iterator[RawSample]:
    """Raw (undecoded) inputs in a deterministic order: a folder of images (a ``NAME.txt`` next
    to an image is its caption) or webdataset / img2dataset shards (a folder or a glob)."""
    p = Path(path)
    if p.is_dir() and not any(p.glob("*.tar")):
        files = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTS and f.is_file())
        if not files:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTS)}) or shards in {p}")
        seen: set[str] = set()
        for f in files:
            key = _folder_key(f.relative_to(p))
            if key in seen:  # a.jpg and a.png: keep both, distinguishable
                key = f"{key}_{f.suffix.lower().lstrip('.')}"
            seen.add(key)
            members = _image_member(f)
            txt = f.with_suffix(".txt")
            if txt.is_file():
                members["txt"] = txt.read_bytes()
            yield RawSample(key=key, members=members, shard=str(p))
    else:
        yield from iter_raw_samples(list_shards(p, split=split))


_REENCODE_MAX_PIXELS = 100_000_000


def _image_member(f: Path) -> dict[str, bytes]:
    """``{ext: bytes}`` for an image file. Formats our shards do not carry (bmp, tif, gif) are
    re-encoded losslessly as PNG so the annotated shards stay readable by the default reader;
    a file that does not decode is passed on as is and reported as a bad image downstream."""
    ext = f.suffix.lower().lstrip(".")
    data = f.read_bytes()
    if ext in ReadKeys().image:
        return {ext: data}
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > _REENCODE_MAX_PIXELS:  # leave bombs to decode_image's guard
                return {"png": data}
            buf = io.BytesIO()
            im.save(buf, format="PNG")
        return {"png": buf.getvalue()}
    except (OSError, ValueError, Image.DecompressionBombError):
        return {"png": data}


# ------------------------------------------------------------------------------ work items
@dataclasses.dataclass
class WorkItem:
    """One image moving through the stages. ``state`` is JSON-able (Ray ships it as text)."""

    index: int
    key: str
    members: dict[str, bytes]
    state: dict[str, Any] = dataclasses.field(default_factory=dict)
    image: Any = None  # decoded PIL image (not shipped between Ray stages)

    def to_row(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "key": self.key,
            "members": json.dumps({k: v.hex() for k, v in self.members.items()}),
            "state": json.dumps(self.state),
        }

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> WorkItem:
        members = {k: bytes.fromhex(v) for k, v in json.loads(str(row["members"])).items()}
        return cls(int(row["index"]), str(row["key"]), members, json.loads(str(row["state"])))


def _decode(item: WorkItem, keys: ReadKeys) -> None:
    """Fill ``item.image`` and (first time) ``state['sample']``; errors mark the item."""
    if item.image is not None or item.state.get("error"):
        return
    try:
        d = decode_raw(RawSample(item.key, item.members, ""), keys)
    except (ImageDecodeError, SchemaError, KeyError, ValueError, OSError) as e:
        item.state["error"] = f"{type(e).__name__}: {e}"
        return
    item.image = d.image
    item.state.setdefault("sample", d.sample.to_dict())


# -------------------------------------------------------------------------------- stages
class StageRunner:
    """Runs some (or all) stages on a batch of items. Built once per process / Ray actor."""

    def __init__(self, cfg: AnnotateConfig, slots: tuple[str, ...] = STAGES) -> None:
        self.cfg = cfg
        self.vocab = load_vocabulary(cfg.vocabulary)
        self.slots = slots
        self.keys = ReadKeys()
        self.annotators: dict[str, Any] = {}
        for s in slots:
            a = build_annotator(s, getattr(cfg, s), self.vocab)
            if a is not None:
                self.annotators[s] = a

    def __call__(self, items: list[WorkItem]) -> list[WorkItem]:
        for it in items:
            _decode(it, self.keys)
        for slot in self.slots:
            ok = [it for it in items if not it.state.get("error")]
            if slot in self.annotators and ok:
                self._run(slot, ok)
        return items

    def _run(self, slot: str, items: list[WorkItem]) -> None:
        t0 = time.perf_counter()
        try:
            getattr(self, f"_{slot}")(self.annotators[slot], items)
        except Exception as e:  # one bad image must not kill the batch: retry one by one
            if len(items) == 1:
                log.warning("%s failed on %r: %s", slot, items[0].key, e)
                items[0].state["error"] = f"{slot}: {type(e).__name__}: {e}"
                return
            for it in items:
                self._run(slot, [it])
            return
        dt = (time.perf_counter() - t0) / len(items)
        for it in items:
            it.state.setdefault("timing", {})[slot] = it.state.get("timing", {}).get(slot, 0) + dt

    @staticmethod
    def _count(it: WorkItem, counts: Counter) -> None:
        c = it.state.setdefault("counts", {})
        for k, v in counts.items():
            c[k] = c.get(k, 0) + int(v)

    def _tagger(self, a: Any, items: list[WorkItem]) -> None:
        for it, tags in zip(items, a.tag([it.image for it in items])):
            it.state["image_tags"] = [[t.name, t.score] for t in tags]

    def _captioner(self, a: Any, items: list[WorkItem]) -> None:
        for it, caps in zip(items, a.caption([it.image for it in items])):
            it.state["model_captions"] = [c for c in caps if c.strip()]

    def _detector(self, a: Any, items: list[WorkItem]) -> None:
        dets: list[Detections] = a.detect([it.image for it in items], self.vocab)
        for it, d in zip(items, dets):
            w, h = it.image.size
            counts: Counter = Counter()
            keep, clipped = filter_boxes(d.boxes, d.scores, w, h, self.cfg.filters, counts)
            self._count(it, counts)
            it.state["regions"] = [
                {
                    "box": [float(v) for v in clipped[i]],
                    "score": float(d.scores[i]),
                    "label": d.labels[i],
                }
                for i in keep
            ]
            it.state["detector"] = a.name

    def _boxes(self, it: WorkItem) -> np.ndarray:
        return np.array([r["box"] for r in it.state.get("regions", [])], np.float32).reshape(-1, 4)

    def _region_labeller(self, a: Any, items: list[WorkItem]) -> None:
        labels = a.label_regions([it.image for it in items], [self._boxes(it) for it in items])
        for it, per_box in zip(items, labels):
            for r, tags in zip(it.state.get("regions", []), per_box):
                r["tags"] = [[t.name, t.score] for t in tags[: self.cfg.region_topk]]
            it.state["region_labeller"] = a.name

    def _masker(self, a: Any, items: list[WorkItem]) -> None:
        masks = a.masks([it.image for it in items], [self._boxes(it) for it in items])
        for it, m in zip(items, masks):
            w, h = it.image.size
            regions = it.state.get("regions", [])
            counts: Counter = Counter()
            keep = filter_masks(m, self._boxes(it), w, h, self.cfg.filters, counts)
            self._count(it, counts)
            kept = []
            for i in keep:
                regions[i]["mask"] = encode_mask(m[i])
                kept.append(regions[i])
            it.state["regions"] = kept
            it.state["masker"] = a.name

    def _region_captioner(self, a: Any, items: list[WorkItem]) -> None:
        caps = a.caption_regions([it.image for it in items], [self._boxes(it) for it in items])
        for it, cs in zip(items, caps):
            for r, c in zip(it.state.get("regions", []), cs):
                r["caption"] = c
            it.state["region_captioner"] = a.name

    def _scorer(self, a: Any, items: list[WorkItem]) -> None:
        f = self.cfg.filters
        texts = [_all_captions(it, self.cfg)[0] for it in items]
        cap_scores = a.image_text([it.image for it in items], texts)
        region_texts = [
            [
                f"a photo of a {r['tags'][0][0]}." if r.get("tags") else "an object."
                for r in it.state.get("regions", [])
            ]
            for it in items
        ]
        reg_scores = a.region_text(
            [it.image for it in items], [self._boxes(it) for it in items], region_texts
        )
        for it, cs, rs in zip(items, cap_scores, reg_scores):
            it.state["caption_scores"] = [float(s) for s in cs]
            counts: Counter = Counter()
            regions = it.state.get("regions", [])
            for r, s in zip(regions, rs):
                r["tag_score"] = float(s)
            trained = bool(getattr(a, "trained", True))
            thr = f.min_region_tag_score if trained else None
            keep = filter_scores(np.asarray(rs), thr, "region_tag_score", counts)
            it.state["regions"] = [regions[i] for i in keep]
            it.state["scores_filter"] = trained
            self._count(it, counts)
            it.state["scorer"] = a.name


def _compose(tags: list[str]) -> str:
    if not tags:
        return ""
    if len(tags) == 1:
        return f"a photo of a {tags[0]}."
    return f"a photo of {', '.join(tags[:-1])} and {tags[-1]}."


def _image_tags(it: WorkItem, cfg: AnnotateConfig) -> list[tuple[str, float]]:
    tags = [(n, float(s)) for n, s in it.state.get("image_tags", []) if s >= cfg.min_tag_score]
    return tags[: cfg.max_image_tags]


def _all_captions(it: WorkItem, cfg: AnnotateConfig) -> tuple[list[str], list[str]]:
    """(captions, sources): the input's, then model captions, else a composed one."""
    s = it.state["sample"]
    caps = list(s.get("captions", []))
    srcs = list(s.get("caption_sources") or ["input"] * len(caps))
    for c in it.state.get("model_captions", []):
        caps.append(c)
        srcs.append("model")
    if not caps and cfg.compose_captions:
        text = _compose([n for n, _ in _image_tags(it, cfg)])
        if text:
            caps.append(text)
            srcs.append("composed")
    return caps, srcs


def finalize(it: WorkItem, cfg: AnnotateConfig) -> Sample:
    """Assemble the output sample (input labels kept, annotations added with sources/scores)."""
    st = it.state
    sample = Sample.from_dict(st["sample"])
    caps, srcs = _all_captions(it, cfg)
    scores = st.get("caption_scores")
    counts: Counter = Counter()
    if scores is not None and len(scores) == len(caps):
        # Only generated captions are filtered; the input's (human) captions are kept as given.
        # An untrained scorer's scores are recorded, never used to drop anything.
        thr = cfg.filters.min_caption_score if st.get("scores_filter", True) else None
        keep = [
            i
            for i in range(len(caps))
            if srcs[i] in ("input", "human") or thr is None or scores[i] >= thr
        ]
        counts["caption_score"] = len(caps) - len(keep)
        caps, srcs, scores = (
            [caps[i] for i in keep],
            [srcs[i] for i in keep],
            [scores[i] for i in keep],
        )
    StageRunner._count(it, counts)
    sample.captions, sample.caption_sources = caps, srcs
    tags = _image_tags(it, cfg)
    for n, _ in tags:
        if n not in sample.tags:
            sample.tags.append(n)
    if not cfg.keep_input_regions:
        sample.regions = []
    source = "+".join(st[k] for k in ("detector", "region_labeller", "masker") if st.get(k))
    for r in st.get("regions", []):
        sample.regions.append(
            Region(
                box=r["box"],
                tags=[t[0] for t in r.get("tags", [])],
                caption=r.get("caption"),
                mask=r.get("mask"),
                score=r["score"],
                source=source or "annotate",
                kind="thing",
            )
        )
    ann = {
        "annotators": {
            k: st[k]
            for k in ("detector", "region_labeller", "masker", "region_captioner", "scorer")
            if st.get(k)
        },
        "tag_scores": {n: s for n, s in tags},
        "region_tag_scores": [
            r.get("tag_score", r["tags"][0][1] if r.get("tags") else None)
            for r in st.get("regions", [])
        ],
    }
    if scores is not None:
        ann["caption_scores"] = scores
    sample.source = {**sample.source, "annotate": ann}
    sample.validate()
    return sample


# ------------------------------------------------------------------------------ executors
def _batches(items: list[WorkItem], n: int) -> Iterator[list[WorkItem]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


class LocalExecutor:
    def __init__(self, cfg: AnnotateConfig) -> None:
        self.cfg = cfg
        self.runner = StageRunner(cfg)

    def run(self, items: list[WorkItem]) -> list[WorkItem]:
        out: list[WorkItem] = []
        for batch in _batches(items, self.cfg.batch_size):
            out.extend(self.runner(batch))
        return out

    def close(self) -> None:
        pass


class _RayStage:
    """A Ray Data actor holding one stage's model."""

    def __init__(self, cfg_dict: dict[str, Any], slot: str) -> None:
        from umgclip.annotate.config import AnnotateConfig as _C
        from umgclip.config import from_dict

        self.runner = StageRunner(from_dict(_C, cfg_dict), (slot,))

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        n = len(batch["index"])
        items = [WorkItem.from_row({k: batch[k][i] for k in batch}) for i in range(n)]
        rows = [it.to_row() for it in self.runner(items)]
        return {k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]} if rows else batch


class RayExecutor:
    """Ray Data: ``from_items`` then one ``map_batches`` actor pool per configured stage."""

    def __init__(self, cfg: AnnotateConfig) -> None:
        import ray

        self.cfg = cfg
        self._own = not ray.is_initialized()
        if self._own:
            ray.init(
                address=cfg.ray.address,
                num_cpus=cfg.ray.num_cpus,
                include_dashboard=False,
                log_to_driver=False,
            )
        self.slots = [s for s in STAGES if getattr(cfg, s).backend != "none"]

    def run(self, items: list[WorkItem]) -> list[WorkItem]:
        import ray

        if not items:
            return []
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True
        blocks = max(1, -(-len(items) // self.cfg.batch_size))
        ds = ray.data.from_items([it.to_row() for it in items], override_num_blocks=blocks)
        cfg_dict = to_dict(self.cfg)
        slots = self.slots or ["tagger"]
        pools = {s: self.cfg.ray.slot_concurrency.get(s, self.cfg.ray.concurrency) for s in slots}
        cpus = self.cfg.ray.actor_cpus
        if cpus is None:
            cpus = float(ray.cluster_resources().get("CPU", 1.0)) / max(1, sum(pools.values()))
        for slot in slots:
            ds = ds.map_batches(
                _RayStage,
                fn_constructor_args=(cfg_dict, slot),
                batch_size=self.cfg.batch_size,
                concurrency=pools[slot],
                num_cpus=cpus,
                batch_format="numpy",
            )
        done = [WorkItem.from_row(r) for r in ds.take_all()]
        return sorted(done, key=lambda it: it.index)

    def close(self) -> None:
        import ray

        if self._own and ray.is_initialized():
            ray.shutdown()


# ------------------------------------------------------------------------------ the run
def config_fingerprint(cfg: AnnotateConfig) -> str:
    """Hash of everything that changes outputs (so a resume never mixes two configs)."""
    d = to_dict(cfg)
    for k in ("ray", "limit"):
        d.pop(k, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _atomic_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _chunks(
    inputs: Iterator[RawSample], size: int, limit: int | None
) -> Iterator[tuple[int, list[RawSample]]]:
    buf: list[RawSample] = []
    c = n = 0
    for raw in inputs:
        if limit is not None and n >= limit:
            break
        buf.append(raw)
        n += 1
        if len(buf) == size:
            yield c, buf
            c, buf = c + 1, []
    if buf:
        yield c, buf


def annotate(
    input_path: str | Path,
    out_dir: str | Path,
    cfg: AnnotateConfig,
    executor: str = "local",
    progress: bool = True,
    stop_after_chunks: int | None = None,
) -> dict[str, Any]:
    """Annotate ``input_path`` into ``out_dir``; returns the summary (also ``summary.json``).

    ``stop_after_chunks`` ends the run early (tests use it to simulate a kill between chunks).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fp = config_fingerprint(cfg)
    manifest_path = out / "manifest.json"
    manifest: dict[str, Any] = {"config": fp, "input": str(input_path), "chunks": {}}
    if manifest_path.is_file():
        old = json.loads(manifest_path.read_text())
        if old.get("config") != fp:
            raise RuntimeError(
                f"{out} holds a run with another config ({old.get('config')} vs {fp}): "
                "use a new --out folder or the original config"
            )
        manifest = old
    prefix = cfg.split or "annot"
    runner: LocalExecutor | RayExecutor = (
        RayExecutor(cfg) if executor == "ray" else LocalExecutor(cfg)
    )
    t_start = time.perf_counter()
    new_chunks = 0
    bar = tqdm(desc="annotate", unit="img", disable=not progress)
    try:
        for c, raws in _chunks(iter_inputs(input_path, cfg.split), cfg.shard_size, cfg.limit):
            if str(c) in manifest["chunks"]:
                bar.update(len(raws))
                continue
            if stop_after_chunks is not None and new_chunks >= stop_after_chunks:
                break
            items = [WorkItem(c * cfg.shard_size + i, r.key, r.members) for i, r in enumerate(raws)]
            done = runner.run(items)
            entry = _write_chunk(out, prefix, c, done, cfg)
            manifest["chunks"][str(c)] = entry
            _atomic_json(manifest_path, manifest)
            new_chunks += 1
            bar.update(len(raws))
    finally:
        bar.close()
        runner.close()
    summary = _summary(manifest, time.perf_counter() - t_start, executor)
    _atomic_json(out / "summary.json", summary)
    return summary


def _write_chunk(
    out: Path, prefix: str, c: int, items: list[WorkItem], cfg: AnnotateConfig
) -> dict[str, Any]:
    entry: dict[str, Any] = {"keys": [], "errors": [], "counts": {}, "timing": {}}
    counts: Counter = Counter()
    timing: Counter = Counter()
    with ShardWriter(out, prefix=f"{prefix}-{c:06d}", max_samples=10**9) as w:
        for it in sorted(items, key=lambda it: it.index):
            sample = None
            if not it.state.get("error"):
                try:
                    sample = finalize(it, cfg)
                except (SchemaError, ValueError, KeyError) as e:
                    it.state["error"] = f"finalize: {type(e).__name__}: {e}"
            if sample is None:
                log.warning("skipped %r: %s", it.key, it.state.get("error"))
                entry["errors"].append({"key": it.key, "error": it.state.get("error")})
                continue
            img = next((e for e in ReadKeys().image if e in it.members), None)
            members = {img: it.members[img], "json": sample.to_json().encode("utf-8")}
            if "panoptic.png" in it.members:
                members["panoptic.png"] = it.members["panoptic.png"]
            w.write_members(sample.key, members)
            entry["keys"].append(sample.key)
            counts.update(it.state.get("counts", {}))
            counts["kept_regions"] += len(it.state.get("regions", []))  # new ones only
            timing.update(it.state.get("timing", {}))
        shards = w.close()
    entry["shards"] = [p.name for p in shards]
    entry["counts"] = dict(counts)
    entry["timing"] = {k: float(v) for k, v in timing.items()}
    return entry


def _summary(manifest: dict[str, Any], wall: float, executor: str) -> dict[str, Any]:
    counts: Counter = Counter()
    timing: Counter = Counter()
    n_ok = n_err = 0
    errors = []
    for e in manifest["chunks"].values():
        counts.update(e["counts"])
        timing.update(e["timing"])
        n_ok += len(e["keys"])
        n_err += len(e["errors"])
        errors.extend(e["errors"])
    return {
        "images": n_ok,
        "errors": n_err,
        "error_examples": errors[:20],
        "filter_counts": {r: int(counts.get(r, 0)) for r in (*RULES, "kept_regions")},
        "annotators": {
            slot: {
                "seconds": round(t, 3),
                "images_per_second": round(n_ok / t, 3) if t > 0 else None,
            }
            for slot, t in timing.items()
        },
        "chunks": len(manifest["chunks"]),
        "executor": executor,
        "wall_seconds_this_run": round(wall, 2),
    }
