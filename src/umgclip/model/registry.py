"""Model registry: names -> configs (``model/configs/*.json``) -> built, loaded models.

``create_model(name, pretrained=...)``:

* ``pretrained=None``: the config's own initial weights (``umg-lite``: ImageNet EfficientNet-Lite0
  + all-MiniLM-L6-v2 from their packages, new projections random; ``umg-vit-*``: random);
* a folder saved by ``save_pretrained``: its config must equal the named config (C24), then
  its weights load strictly;
* a file: an open_clip / OpenAI CLIP checkpoint (ViT models), or our own ``model.safetensors``.

Models are returned in eval mode; call ``.train()`` to train. Nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from umgclip.config import apply_overrides
from umgclip.model.io import (
    CheckpointError,
    check_config_matches,
    is_model_dir,
    load_weights,
    read_config,
    read_open_clip_state_dict,
)
from umgclip.model.model_config import ModelConfig
from umgclip.model.preprocess import build_preprocess
from umgclip.model.tokenizer import build_tokenizer
from umgclip.model.umgclip import UMGCLIP

CONFIG_DIR = Path(__file__).parent / "configs"


def list_models() -> list[str]:
    """Names of the registered model configs."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def get_model_config(name: str, overrides: list[str] | None = None) -> ModelConfig:
    """The registered config ``name`` (or a saved model folder's), with ``k=v`` overrides."""
    if is_model_dir(name):
        data = read_config(name).to_dict()
    else:
        path = CONFIG_DIR / f"{name}.json"
        if not path.is_file():
            raise ValueError(f"unknown model {name!r}; known: {list_models()}")
        data = json.loads(path.read_text())
    apply_overrides(data, list(overrides or []))
    return ModelConfig.from_dict(data)


def _text_sources(cfg: ModelConfig, model_dir: Path | None) -> tuple[Path | None, Path | None]:
    """(HF architecture folder, HF tokenizer folder) for an hf text tower."""
    if cfg.text.kind != "hf":
        return None, None
    if model_dir is not None:
        return model_dir / "text_tower", model_dir / "tokenizer"
    from umgclip.model.towers.hf_text import resolve_source

    src = resolve_source(cfg.text.source)
    return src, src


def build_model(
    cfg: ModelConfig, init_weights: bool = True, model_dir: Path | None = None
) -> UMGCLIP:
    """Construct the model ``cfg`` describes. ``init_weights=False`` skips loading the packaged
    tower weights (they are about to be overwritten by a checkpoint)."""
    arch_dir, tok_dir = _text_sources(cfg, model_dir)
    tokenizer = build_tokenizer(cfg.tokenizer, tok_dir)
    ic, tc = cfg.image, cfg.text
    if ic.kind == "efficientnet_lite":
        from umgclip.model.towers.efficientnet import EfficientNetLiteTower

        icfg = ic if init_weights else dataclasses.replace(ic, weights="none")
        image_tower = EfficientNetLiteTower(icfg, cfg.embed_dim)
    elif ic.kind == "open_clip_vit":
        from umgclip.model.towers.openclip import OpenCLIPVisionTower

        image_tower = OpenCLIPVisionTower(
            ic.open_clip, cfg.embed_dim, cfg.quick_gelu, cfg.clustering
        )
    else:
        raise ValueError(f"image.kind must be efficientnet_lite or open_clip_vit, got {ic.kind!r}")
    if tc.kind == "hf":
        from umgclip.model.towers.hf_text import HFTextTower

        text_tower = HFTextTower(
            tc, cfg.embed_dim, tokenizer.pad_token_id, arch_dir=arch_dir, load_weights=init_weights
        )
    elif tc.kind == "open_clip":
        from umgclip.model.towers.openclip import OpenCLIPTextTower

        text_tower = OpenCLIPTextTower(tc.open_clip, cfg.embed_dim, cfg.quick_gelu)
    else:
        raise ValueError(f"text.kind must be hf or open_clip, got {tc.kind!r}")
    return UMGCLIP(cfg, image_tower, text_tower, tokenizer)


def load_model(
    model_dir: str | Path,
    config: ModelConfig | dict[str, Any] | None = None,
    device: str | torch.device = "cpu",
) -> UMGCLIP:
    """Load a folder written by ``save_pretrained``. If ``config`` is given it must equal the
    stored one (C24); otherwise everything comes from the folder. Returned in eval mode."""
    model_dir = Path(model_dir)
    cfg = read_config(model_dir)
    if config is not None:
        check_config_matches(config, cfg, str(model_dir))
    model = build_model(cfg, init_weights=False, model_dir=model_dir)
    load_weights(model, model_dir)
    return model.to(device).eval()


def load_open_clip_weights(model: UMGCLIP, path: str | Path) -> None:
    """Load an open_clip / OpenAI CLIP checkpoint into a ``umg-vit-*`` model (strict)."""
    from umgclip.model.towers.openclip import map_open_clip_state_dict

    if model.cfg.image.kind != "open_clip_vit" or model.cfg.text.kind != "open_clip":
        raise CheckpointError(f"{model.cfg.name} has no open_clip towers to load {path} into")
    sd = map_open_clip_state_dict(read_open_clip_state_dict(path))
    sd.pop("logit_bias", None)  # SigLIP-style bias: not part of this model
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise CheckpointError(
            f"{path} does not fit {model.cfg.name} (check the model name / quick_gelu / sizes): {e}"
        ) from e


def create_model(
    name: str,
    pretrained: str | Path | None = None,
    device: str | torch.device = "cpu",
    overrides: list[str] | None = None,
) -> UMGCLIP:
    """Build model ``name`` (a registered name or a saved folder); see the module docstring."""
    if is_model_dir(name):
        return load_model(name, device=device)
    cfg = get_model_config(name, overrides)
    if pretrained is None:
        return build_model(cfg).to(device).eval()
    p = Path(pretrained)
    if p.is_dir():
        if not is_model_dir(p):
            raise CheckpointError(f"{p} is not a saved umgclip model (config.json + weights)")
        return load_model(p, config=cfg, device=device)
    if not p.is_file():
        raise CheckpointError(f"pretrained {pretrained!r} is neither a model folder nor a file")
    model = build_model(cfg, init_weights=False)
    if p.name == "model.safetensors" and (p.parent / "config.json").is_file():
        check_config_matches(cfg, read_config(p.parent), str(p.parent))
        load_weights(model, p.parent)
    else:
        load_open_clip_weights(model, p)
    return model.to(device).eval()


def create_model_and_transforms(
    name: str,
    pretrained: str | Path | None = None,
    device: str | torch.device = "cpu",
    overrides: list[str] | None = None,
) -> tuple[UMGCLIP, Callable]:
    """``(model, preprocess)``: ``preprocess`` turns a PIL image into the model's input tensor."""
    model = create_model(name, pretrained=pretrained, device=device, overrides=overrides)
    return model, build_preprocess(model.preprocess_cfg)


def get_tokenizer(name_or_dir: str | Path, context_length: int | None = None):
    """The tokenizer of a registered model or a saved model folder.

    ``context_length`` other than the model's is rejected (C08): a model can only read ids of
    the length its text tower was built for.
    """
    model_dir = Path(name_or_dir) if is_model_dir(name_or_dir) else None
    cfg = get_model_config(str(name_or_dir))
    if context_length is not None and context_length != cfg.tokenizer.context_length:
        raise ValueError(
            f"context_length {context_length} differs from {cfg.name}'s "
            f"{cfg.tokenizer.context_length}"
        )
    _, tok_dir = _text_sources(cfg, model_dir)
    return build_tokenizer(cfg.tokenizer, tok_dir)
