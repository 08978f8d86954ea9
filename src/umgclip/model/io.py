"""Saving and loading UMG-CLIP models.

A saved model is a folder::

    config.json          {"format": "umgclip", "format_version": 1, "model": ModelConfig}
    model.safetensors    the full state dict (both towers, heads, logit_scale)
    tokenizer/           HF tokenizer files (hf text towers only; CLIP BPE ships in open_clip)
    text_tower/          HF encoder architecture config (hf text towers only)

so that a reload needs neither the weight packages nor any default: architecture (including the
activation), preprocess and tokenizer settings all come from the folder (C24). Weights are read
with safetensors only; open_clip checkpoints with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from umgclip.model.model_config import FORMAT_VERSION, ModelConfig, diff_configs

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TOKENIZER_DIR = "tokenizer"
TEXT_ARCH_DIR = "text_tower"


class CheckpointError(ValueError):
    """A checkpoint is missing, malformed, or does not match the expected config."""


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def save_pretrained(model: torch.nn.Module, out_dir: str | Path) -> Path:
    """Write ``model`` (a ``UMGCLIP``) to ``out_dir``; other files in the folder are kept."""
    from safetensors.torch import save_model

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg: ModelConfig = model.cfg
    if cfg.text.kind == "hf":
        model.text_tower.save_arch(out / TEXT_ARCH_DIR)
        model.tokenizer.save(out / TOKENIZER_DIR)
    tmp = out / (WEIGHTS_NAME + ".tmp")
    save_model(model, str(tmp), metadata={"format": "pt", "umgclip_model": cfg.name})
    os.replace(tmp, out / WEIGHTS_NAME)
    payload = {"format": "umgclip", "format_version": FORMAT_VERSION, "model": cfg.to_dict()}
    _atomic_write_text(out / CONFIG_NAME, json.dumps(payload, indent=2) + "\n")
    return out


def is_model_dir(path: str | Path) -> bool:
    p = Path(path)
    return (p / CONFIG_NAME).is_file() and (p / WEIGHTS_NAME).is_file()


def read_config(model_dir: str | Path) -> ModelConfig:
    """The :class:`ModelConfig` stored in a saved model folder."""
    p = Path(model_dir) / CONFIG_NAME
    if not p.is_file():
        raise CheckpointError(f"{model_dir} is not a umgclip model folder (no {CONFIG_NAME})")
    data = json.loads(p.read_text())
    if data.get("format") != "umgclip" or "model" not in data:
        raise CheckpointError(f"{p} is not a umgclip config (missing format/model keys)")
    if int(data.get("format_version", 0)) > FORMAT_VERSION:
        raise CheckpointError(
            f"{p} has format_version {data['format_version']}, this umgclip reads <= "
            f"{FORMAT_VERSION}: upgrade umgclip"
        )
    return ModelConfig.from_dict(data["model"])


def check_config_matches(
    expected: ModelConfig | dict[str, Any], found: ModelConfig, where: str
) -> None:
    """Raise :class:`CheckpointError` listing every field where ``expected`` != ``found`` (C24)."""
    exp = expected.to_dict() if isinstance(expected, ModelConfig) else expected
    diffs = [d for d in diff_configs(exp, found.to_dict()) if not d.startswith("name")]
    if diffs:
        raise CheckpointError(
            f"config given for {where} does not match the checkpoint's config.json: "
            + "; ".join(diffs)
        )


def load_weights(model: torch.nn.Module, model_dir: str | Path) -> None:
    """Load ``model.safetensors`` strictly (every tensor present, every shape equal)."""
    from safetensors.torch import load_model

    path = Path(model_dir) / WEIGHTS_NAME
    if not path.is_file():
        raise CheckpointError(f"{model_dir} has no {WEIGHTS_NAME}")
    try:
        load_model(model, str(path), strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"weights in {path} do not fit the model: {e}") from e


def read_open_clip_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from an open_clip / OpenAI CLIP checkpoint file (no arbitrary pickles).

    Accepts ``.safetensors``, a ``torch.save``'d state dict (optionally under ``state_dict``, as
    open_clip's training checkpoints store it) and OpenAI's TorchScript archives.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint file not found: {p}")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(p))
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - fall back to TorchScript below, else report
        try:
            # OpenAI's released .pt files are TorchScript archives, not pickles.
            return dict(torch.jit.load(str(p), map_location="cpu").state_dict())
        except Exception:  # noqa: BLE001
            raise CheckpointError(
                f"{p} is neither a weights-only torch checkpoint nor TorchScript: {e}"
            ) from e
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{p} does not hold a state dict of tensors")
    # OpenAI archives carry these scalars; they are config, not weights.
    for k in ("input_resolution", "context_length", "vocab_size"):
        obj.pop(k, None)
    return obj
