"""Webdataset tar shards: an atomic writer and a fault-tolerant reader.

A sample is a group of tar members sharing a key: ``KEY.jpg`` (original bytes) + ``KEY.json``
(our :class:`~umgclip.data.schema.Sample`) + optional ``KEY.panoptic.png``. The reader also takes
img2dataset output (``KEY.jpg|jpeg|png|webp`` + ``KEY.txt`` caption + optional ``KEY.json``
metadata and ``KEY.cls``), with the member extensions configurable in :class:`ReadKeys`.

Tar parsing and grouping members into samples use webdataset's own ``tar_file_iterator`` and
``group_by_keys``; we drive them one shard at a time (instead of ``wds.WebDataset``) because we
must know *which* shard was truncated and after how many samples (C23), and because
webdataset's handlers can only swallow errors, not count them per reason (C04, C21).
"""

from __future__ import annotations

import glob
import io
import json
import logging
import os
import re
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_iterator

from umgclip.data.images import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image
from umgclip.data.schema import Sample, SchemaError

log = logging.getLogger(__name__)


class ShardFormatError(RuntimeError):
    """Shards do not contain the members the reader was configured for (fail fast, C21)."""


# --------------------------------------------------------------------------------------------
# Skip accounting
# --------------------------------------------------------------------------------------------


@dataclass
class SkipCounter:
    """Counts skipped samples by reason, keeps a few example keys, and logs each skip.

    One bad sample never stops a run; :meth:`summary` says how many were dropped and why.
    """

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    max_examples: int = 5

    def add(self, reason: str, key: str, detail: str = "") -> None:
        self.counts[reason] += 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < self.max_examples:
            ex.append(key)
        log.warning("skipped sample %r (%s)%s", key, reason, f": {detail}" if detail else "")

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.counts:
            return "no samples skipped"
        parts = [
            f"{n} {r} (e.g. {', '.join(self.examples.get(r, []))})"
            for r, n in self.counts.most_common()
        ]
        return f"skipped {self.total} samples: " + "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {"total": self.total, "by_reason": dict(self.counts), "examples": self.examples}


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


class ShardWriter:
    """Write samples into ``{prefix}-{i:06d}.tar`` shards of at most ``max_samples`` samples.

    Each shard is written as ``*.tar.tmp`` and renamed when complete, so a reader (or a crashed
    import) never sees a half-written shard under its final name. Use as a context manager; on
    an exception the unfinished temporary shard is removed.
    """

    def __init__(self, out_dir: str | Path, prefix: str = "shard", max_samples: int = 1000) -> None:
        if max_samples < 1:
            raise ValueError(f"max_samples must be >= 1, got {max_samples}")
        if "/" in prefix or not prefix:
            raise ValueError(f"prefix must be a plain file-name prefix, got {prefix!r}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.max_samples = max_samples
        self.shards: list[Path] = []
        self.count = 0
        self._tar: tarfile.TarFile | None = None
        self._fileobj: Any = None
        self._n_in_shard = 0
        self._keys: set[str] = set()

    def _open(self) -> None:
        final = self.out_dir / f"{self.prefix}-{len(self.shards):06d}.tar"
        self._tmp = final.with_suffix(".tar.tmp")
        self._final = final
        self._fileobj = open(self._tmp, "wb")  # noqa: SIM115 - closed in _finish
        # Plain tarfile (not wds.TarWriter) so member mtimes are fixed: identical input gives
        # byte-identical shards, which makes imports reproducible and diffable.
        self._tar = tarfile.open(fileobj=self._fileobj, mode="w", format=tarfile.USTAR_FORMAT)
        self._n_in_shard = 0

    def _finish(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        self._fileobj.flush()
        os.fsync(self._fileobj.fileno())
        self._fileobj.close()
        os.replace(self._tmp, self._final)
        self.shards.append(self._final)
        self._tar = None

    def write_members(self, key: str, members: dict[str, bytes]) -> None:
        """Write one sample given as ``{extension: bytes}`` (e.g. ``{"jpg": ..., "json": ...}``)."""
        if not key or "." in key or "/" in key:
            raise ValueError(f"sample key must be non-empty without '.' or '/': {key!r}")
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r}")
        self._keys.add(key)
        if self._tar is None:
            self._open()
        assert self._tar is not None
        for ext, data in members.items():
            if not isinstance(data, bytes):
                raise TypeError(f"member {key}.{ext} must be bytes, got {type(data).__name__}")
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o444
            self._tar.addfile(info, io.BytesIO(data))
        self._n_in_shard += 1
        self.count += 1
        if self._n_in_shard >= self.max_samples:
            self._finish()

    def write(
        self,
        sample: Sample,
        image_bytes: bytes,
        image_ext: str = "jpg",
        panoptic_png: bytes | None = None,
    ) -> None:
        """Write a :class:`Sample` with its original encoded image (and panoptic PNG)."""
        members = {image_ext: image_bytes, "json": sample.to_json().encode("utf-8")}
        if panoptic_png is not None:
            members["panoptic.png"] = panoptic_png
        self.write_members(sample.key, members)

    def close(self) -> list[Path]:
        """Finish the last shard; returns every shard written."""
        self._finish()
        return self.shards

    def abort(self) -> None:
        """Drop the unfinished shard (complete shards stay)."""
        if self._tar is not None:
            try:
                self._tar.close()
                self._fileobj.close()
            finally:
                self._tmp.unlink(missing_ok=True)
                self._tar = None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


@dataclass
class ReadKeys:
    """Which tar member extensions make a sample (C21). Extensions are matched lower-case.

    ``require`` lists what a sample must have: ``"image"`` and optionally ``"caption"``
    (``.txt`` or a caption inside our JSON). A sample lacking them is skipped and counted; after
    ``max_consecutive_missing`` such samples in a row the reader stops with
    :class:`ShardFormatError` naming the extensions it did find.
    """

    image: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
    caption: tuple[str, ...] = ("txt",)
    json: tuple[str, ...] = ("json",)
    cls: tuple[str, ...] = ("cls",)
    panoptic: tuple[str, ...] = ("panoptic.png",)
    require: tuple[str, ...] = ("image",)
    max_consecutive_missing: int = 100


@dataclass
class RawSample:
    """Undecoded members of one sample (cheap to buffer and shuffle)."""

    key: str
    members: dict[str, bytes]
    shard: str


@dataclass
class DecodedSample:
    """A sample with decoded pixels: ``image`` is RGB, ``panoptic`` an int32 id map or None."""

    sample: Sample
    image: Image.Image
    panoptic: np.ndarray | None = None


def list_shards(dir_or_glob: str | Path, split: str | None = None) -> list[Path]:
    """Sorted ``.tar`` shards in a folder (optionally only ``{split}-*.tar``) or matching a glob.

    The split filter applies to split-organised folders (``train-*.tar``, ``val-*.tar``, as
    ``umgclip data import-coco`` writes). Shards that carry no split name at all (img2dataset's
    ``00000.tar``) are all used, with a log line saying so; a single ``.tar`` named explicitly is
    always used as given.
    """
    p = Path(dir_or_glob)
    if p.is_file():
        return [p]
    if p.is_dir():
        paths = sorted(p.glob("*.tar"))
    else:
        paths = sorted(Path(x) for x in glob.glob(str(dir_or_glob)) if x.endswith(".tar"))
    if split and paths:
        named = [x for x in paths if _SPLIT_NAME.match(x.name)]
        if named:
            paths = [x for x in named if x.name.startswith(f"{split}-")]
        else:
            log.info(
                "%s: shards carry no split name; using all %d for split %r", p, len(paths), split
            )
    if not paths:
        what = f"split {split!r} shards" if split else "shards"
        raise FileNotFoundError(f"no {what} (*.tar) found at {dir_or_glob}")
    return paths


#: ``{split}-NNNNNN...tar``: how split-organised shard folders name their shards.
_SPLIT_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*-\d+(?:-\d+)*\.tar$")


def _first(members: dict[str, bytes], exts: Iterable[str]) -> tuple[str, bytes] | None:
    for e in exts:
        if e in members:
            return e, members[e]
    return None


def iter_raw_samples(
    paths: Iterable[str | Path], skips: SkipCounter | None = None
) -> Iterator[RawSample]:
    """Group tar members into raw samples, shard by shard.

    A truncated or corrupt shard yields every complete sample before the damage; the rest is
    recorded in ``skips`` as ``truncated_shard`` (C23) and reading goes on with the next shard.
    """
    skips = skips if skips is not None else SkipCounter()
    for path in paths:
        path = str(path)
        errors: list[Exception] = []

        def stop(exn: Exception, _errors: list[Exception] = errors) -> bool:
            _errors.append(exn)
            return False  # stop reading this shard; later members cannot be trusted

        def files(path: str = path, _errors: list[Exception] = errors) -> Iterator[dict[str, Any]]:
            try:
                with open(path, "rb") as f:
                    for item in tar_file_iterator(f, handler=stop):
                        item["__url__"] = path
                        yield item
            except (tarfile.TarError, OSError, EOFError) as e:
                _errors.append(e)

        n = 0
        pending: dict[str, Any] | None = None
        prev_exts: set[str] = set()
        # group_by_keys yields a sample when the next key starts; hold one back so that a
        # sample cut short by a truncation is not passed on as if it were complete.
        for group in group_by_keys(files(), keys=base_plus_ext, handler=stop):
            if pending is not None:
                prev_exts = set(pending) - {"__key__", "__url__"}
                yield pending_to_raw(pending, path)
                n += 1
            pending = group
        if pending is not None:
            exts = set(pending) - {"__key__", "__url__"}
            # Members that were read are complete (a failed member is never yielded); the last
            # sample is incomplete when it lacks member types its predecessor had.
            if errors and exts < prev_exts:
                skips.add("truncated_member", str(pending.get("__key__")), f"in {path}")
            else:
                yield pending_to_raw(pending, path)
                n += 1
        if errors:
            skips.add(
                "truncated_shard",
                Path(path).name,
                f"read {n} complete samples, then {type(errors[0]).__name__}: {errors[0]}",
            )


def pending_to_raw(group: dict[str, Any], path: str) -> RawSample:
    members = {k: v for k, v in group.items() if not k.startswith("__")}
    return RawSample(key=str(group["__key__"]), members=members, shard=path)


def _sample_key(raw_key: str) -> str:
    # Our keys may not contain '/' or '.'; img2dataset keys in sub-folders do.
    return os.path.basename(raw_key).replace(".", "_") or "unnamed"


def decode_panoptic(png: bytes, key: str = "") -> np.ndarray:
    """COCO panoptic PNG -> int32 segment-id map (``R + 256 G + 256^2 B``)."""
    rgb = np.asarray(decode_image(png, key=key), dtype=np.int32)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def decode_raw(
    raw: RawSample, keys: ReadKeys, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> DecodedSample:
    """Decode a raw sample; raises ImageDecodeError / SchemaError / KeyError on bad input."""
    img = _first(raw.members, keys.image)
    if img is None:
        raise KeyError("image")
    key = _sample_key(raw.key)
    image = decode_image(img[1], key=raw.key, max_pixels=max_pixels)
    meta_item = _first(raw.members, keys.json)
    meta: Any = None
    if meta_item is not None:
        try:
            meta = json.loads(meta_item[1])
        except json.JSONDecodeError as e:
            raise SchemaError(f"{raw.key}.{meta_item[0]} is not valid JSON: {e}") from e
    if isinstance(meta, dict) and "schema_version" in meta:
        sample = Sample.from_dict(meta)
        if (sample.width, sample.height) != image.size:
            raise SchemaError(
                f"{raw.key}: JSON says {sample.width}x{sample.height}, image is "
                f"{image.size[0]}x{image.size[1]}"
            )
    else:
        # img2dataset-style sample: caption from .txt, foreign metadata kept under source.
        captions: list[str] = []
        txt = _first(raw.members, keys.caption)
        if txt is not None:
            captions = [txt[1].decode("utf-8", errors="replace").strip()]
        source: dict[str, Any] = {"shard": os.path.basename(raw.shard)}
        if meta is not None:
            source["metadata"] = meta
        cls = _first(raw.members, keys.cls)
        if cls is not None:
            text = cls[1].decode("utf-8", errors="replace").strip()
            source["cls"] = int(text) if text.lstrip("-").isdigit() else text
        sample = Sample(
            key=key,
            width=image.size[0],
            height=image.size[1],
            captions=captions,
            caption_sources=["input"] * len(captions),
            source=source,
        )
    if "caption" in keys.require and not any(c.strip() for c in sample.captions):
        raise KeyError("caption")
    pan = _first(raw.members, keys.panoptic)
    panoptic = decode_panoptic(pan[1], key=raw.key) if pan is not None else None
    return DecodedSample(sample=sample, image=image, panoptic=panoptic)


class _MissingGuard:
    """Fail fast when many consecutive samples lack the required members (C21)."""

    def __init__(self, keys: ReadKeys) -> None:
        self.keys = keys
        self.run = 0
        self.seen_exts: Counter = Counter()

    def missing(self, raw: RawSample, what: str) -> None:
        self.run += 1
        self.seen_exts.update(raw.members.keys())
        if self.run >= self.keys.max_consecutive_missing:
            found = ", ".join(f".{e} ({n})" for e, n in self.seen_exts.most_common())
            raise ShardFormatError(
                f"{self.run} consecutive samples have no {what} member "
                f"(looked for {self._wanted(what)}); the shards contain: {found or 'nothing'}. "
                f"Configure ReadKeys (e.g. image=/caption= extensions) to match the shards."
            )

    def _wanted(self, what: str) -> str:
        exts = self.keys.image if what == "image" else self.keys.caption + ("json captions",)
        return ", ".join(f".{e}" for e in exts)

    def ok(self) -> None:
        self.run = 0
        self.seen_exts.clear()


def decode_stream(
    raws: Iterable[RawSample],
    keys: ReadKeys | None = None,
    skip_counter: SkipCounter | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> Iterator[DecodedSample]:
    """Decode raw samples, skipping (and counting, with the key) every one that fails."""
    keys = keys or ReadKeys()
    skips = skip_counter if skip_counter is not None else SkipCounter()
    guard = _MissingGuard(keys)
    for raw in raws:
        try:
            decoded = decode_raw(raw, keys, max_pixels=max_pixels)
        except KeyError as e:
            what = str(e.args[0]) if e.args else "required"
            guard.missing(raw, what)
            skips.add(f"no_{what}", raw.key, f"members: {sorted(raw.members)}")
            continue
        except ImageDecodeError as e:
            guard.ok()
            skips.add("bad_image", raw.key, str(e))
            continue
        except (SchemaError, ValueError, TypeError) as e:
            guard.ok()
            skips.add("bad_json", raw.key, str(e))
            continue
        guard.ok()
        yield decoded


def iter_shard_samples(
    paths: Iterable[str | Path],
    keys: ReadKeys | None = None,
    skip_counter: SkipCounter | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> Iterator[DecodedSample]:
    """Every readable sample of the given shards, in order, decoded.

    Bad samples (no image, corrupt image, bad JSON) and truncated shards are skipped and
    counted in ``skip_counter`` (see :meth:`SkipCounter.summary`); too many consecutive samples
    without the required members raise :class:`ShardFormatError`.
    """
    skips = skip_counter if skip_counter is not None else SkipCounter()
    yield from decode_stream(iter_raw_samples(paths, skips), keys, skips, max_pixels)
