"""Cache of vocabulary text embeddings, keyed by (model weights, texts, encoding options).

Encoding the 1114-name default vocabulary with a text tower costs tens of seconds on CPU, and
every process (each Ray actor) would pay it again. The key hashes the model's actual weights
rather than its name or path: two processes that build ``umg-lite`` without a checkpoint may
hold different random projections, and a retrained checkpoint at the same path must not reuse
stale embeddings. Entries live in memory and (unless disabled) as safetensors files written
atomically, so concurrent actors never read a half-written file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)

_MEMORY: dict[str, torch.Tensor] = {}


def default_cache_dir() -> Path:
    """``$UMGCLIP_CACHE/text_emb`` (default ``~/.cache/umgclip/text_emb``)."""
    root = os.environ.get("UMGCLIP_CACHE") or Path.home() / ".cache" / "umgclip"
    return Path(root) / "text_emb"


def module_fingerprint(module: torch.nn.Module) -> str:
    """SHA-256 of every parameter and buffer (names, dtypes, shapes and bytes)."""
    h = hashlib.sha256()
    for name, t in sorted(
        {**dict(module.named_parameters()), **dict(module.named_buffers())}.items()
    ):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        # bf16 has no numpy dtype: hash the raw bytes through a uint8 view.
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def cache_key(fingerprint: str, texts: list[str], **options: object) -> str:
    payload = json.dumps([fingerprint, texts, options], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:32]


def cached_text_embeddings(
    encode: Callable[[list[str]], torch.Tensor],
    texts: list[str],
    key: str,
    cache_dir: str | Path | None = "auto",
) -> torch.Tensor:
    """``encode(texts)``, reusing a previous result with the same ``key`` (from memory, then
    from ``cache_dir``; ``None`` keeps the cache in memory only, ``"auto"`` uses
    :func:`default_cache_dir`). A corrupt cache file is logged and recomputed."""
    if key in _MEMORY:
        return _MEMORY[key]
    path = None
    if cache_dir is not None:
        d = default_cache_dir() if cache_dir == "auto" else Path(cache_dir)
        path = d / f"{key}.safetensors"
        if path.is_file():
            try:
                emb = load_file(str(path))["emb"]
                if emb.shape[0] == len(texts):
                    _MEMORY[key] = emb
                    return emb
                log.warning(
                    "text cache %s has %d rows, expected %d", path, emb.shape[0], len(texts)
                )
            except Exception as e:  # a truncated or foreign file: recompute, never crash
                log.warning("ignoring unreadable text cache %s: %s", path, e)
    emb = encode(texts).float().cpu().contiguous()
    _MEMORY[key] = emb
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
            os.close(fd)
            save_file({"emb": emb}, tmp)
            os.chmod(tmp, 0o644)  # mkstemp makes 0600; a shared cache should be readable
            os.replace(tmp, path)
        except OSError as e:  # a read-only home must not stop annotation
            log.warning("could not write text cache %s: %s", path, e)
    return emb
