"""Tokenizers with one contract: ``tok(texts) -> LongTensor(N, context_length)``.

Both keep the end token in the last slot when they truncate (C06), encode "" as start + end only
(C07) and put exactly one end token per row (C09); with ``truncate=False`` an overlong text is a
``ValueError`` that names its token count.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import torch

from umgclip.model.model_config import TokenizerConfig


def _as_list(texts: str | Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        return [texts]
    out = list(texts)
    for i, t in enumerate(out):
        if not isinstance(t, str):
            raise TypeError(f"text {i} is {type(t).__name__}, expected str")
    return out


@lru_cache(maxsize=4)
def _simple_tokenizer(context_length: int):
    # Reading the BPE merges takes about a second; the tokenizer is stateless apart from its
    # cache, so models built in one process share it.
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=context_length)


class CLIPBPETokenizer:
    """open_clip's CLIP BPE tokenizer (its vocabulary ships inside open_clip)."""

    kind = "open_clip"

    def __init__(self, context_length: int = 77, truncate: bool = True) -> None:
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 (start + end), got {context_length}")
        self._tok = _simple_tokenizer(context_length)
        self.context_length = context_length
        self.truncate = truncate
        self.sot_token_id = self._tok.sot_token_id
        self.eot_token_id = self._tok.eot_token_id
        self.pad_token_id = 0

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        items = _as_list(texts)
        if not self.truncate:
            for i, t in enumerate(items):
                n = len(self._tok.encode(t)) + 2
                if n > self.context_length:
                    raise ValueError(
                        f"text {i} has {n} tokens (with start/end), more than the context "
                        f"length {self.context_length}, and truncate=False"
                    )
        # open_clip truncates by token count and writes EOT into the last slot.
        return self._tok(items, context_length=self.context_length)

    def save(self, out_dir: Path) -> None:
        """Nothing to write: the BPE vocabulary is part of open_clip itself."""


class HFTokenizer:
    """A transformers (WordPiece) tokenizer; ``[SEP]`` plays the end token, ``[PAD]`` is 0."""

    kind = "hf"

    def __init__(self, source: str | Path, context_length: int, truncate: bool = True) -> None:
        from transformers import AutoTokenizer

        from umgclip.model.towers.hf_text import _offline

        _offline()
        self._tok = AutoTokenizer.from_pretrained(str(source), local_files_only=True)
        model = getattr(getattr(self._tok, "backend_tokenizer", None), "model", None)
        if hasattr(model, "max_input_chars_per_word"):
            # WordPiece maps any "word" over 100 characters to a single [UNK] (a 500-digit
            # number becomes one token): split it into word pieces like any other word (C06).
            model.max_input_chars_per_word = 1_000_000
        limit = self._tok.model_max_length
        if context_length < 2 or (limit and context_length > limit):
            raise ValueError(
                f"context_length {context_length} outside [2, {limit}] for tokenizer {source}"
            )
        self.context_length = context_length
        self.truncate = truncate
        self.sot_token_id = self._tok.cls_token_id
        self.eot_token_id = self._tok.sep_token_id
        self.pad_token_id = self._tok.pad_token_id

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        items = _as_list(texts)
        if not self.truncate:
            lengths = [len(ids) for ids in self._tok(items, add_special_tokens=True)["input_ids"]]
            for i, n in enumerate(lengths):
                if n > self.context_length:
                    raise ValueError(
                        f"text {i} has {n} tokens (with [CLS]/[SEP]), more than the context "
                        f"length {self.context_length}, and truncate=False"
                    )
        enc = self._tok(
            items,
            padding="max_length",
            truncation=True,
            max_length=self.context_length,
            return_tensors="pt",
        )
        return enc["input_ids"].long()

    def save(self, out_dir: Path) -> None:
        """Write the tokenizer files, so a saved model needs no package to tokenize."""
        self._tok.save_pretrained(str(out_dir))


def build_tokenizer(cfg: TokenizerConfig, source: str | Path | None = None):
    """The tokenizer a config describes; ``source`` is the HF tokenizer folder for ``hf``."""
    if cfg.kind == "open_clip":
        return CLIPBPETokenizer(cfg.context_length, cfg.truncate)
    if cfg.kind == "hf":
        if source is None:
            raise ValueError("an hf tokenizer needs a source folder")
        return HFTokenizer(source, cfg.context_length, cfg.truncate)
    raise ValueError(f"tokenizer.kind must be 'hf' or 'open_clip', got {cfg.kind!r}")
