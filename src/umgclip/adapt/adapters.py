"""``add_adapters(model, cfg)``: freeze a model and insert trainable bypasses into its image tower.

ViT towers (open_clip ``VisionTransformer``): a Convpass pair in every residual block. CNN towers
(umg-lite's EfficientNet-Lite0): a :class:`~umgclip.model.convpass.ConvBypass` parallel to every
block of the tower's block list (see convpass.py for why this is the honest CNN equivalent).
Adapter parameter names contain ``convpass_`` or ``conv_bypass`` so checkpoints can hold only them.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from umgclip.adapt.config import AdapterConfig
from umgclip.model.convpass import (
    ConvBypass,
    Convpass,
    attach_convpass_to_block,
    attach_stage_bypass,
)

log = logging.getLogger(__name__)

ADAPTER_KEYS = ("convpass_", "conv_bypass")


@dataclass
class AdapterInfo:
    kind: str  # "convpass" or "conv_bypass"
    n_adapters: int
    trainable: int
    total: int

    def __str__(self) -> str:
        pct = 100.0 * self.trainable / max(self.total, 1)
        return (
            f"{self.n_adapters} {self.kind} adapters: {self.trainable:,} trainable / "
            f"{self.total:,} total parameters ({pct:.2f}%)"
        )


def is_adapter_param(name: str) -> bool:
    return any(k in name for k in ADAPTER_KEYS)


def image_tower(model: nn.Module) -> nn.Module:
    """The module that owns the image pathway (``model.image_tower``, else the model itself)."""
    return getattr(model, "image_tower", model)


def _find_vit(tower: nn.Module) -> nn.Module | None:
    for m in (tower, getattr(tower, "visual", None), getattr(tower, "trunk", None)):
        if m is not None and hasattr(m, "transformer") and hasattr(m.transformer, "resblocks"):
            return m
    return None


def _find_cnn_blocks(tower: nn.Module) -> list[nn.Module]:
    """The CNN's block sequence: ``tower.adapter_stages()`` if the tower offers it, else the first
    ``blocks``/``_blocks``/``stages`` container found (timm and efficientnet-lite layouts)."""
    if hasattr(tower, "adapter_stages"):
        return list(tower.adapter_stages())
    for _name, mod in tower.named_modules():
        for attr in ("blocks", "_blocks", "stages"):
            seq = getattr(mod, attr, None)
            if isinstance(seq, (nn.Sequential, nn.ModuleList)) and len(seq) > 0:
                return list(seq)
    raise ValueError(
        f"add_adapters: {type(tower).__name__} is neither an open_clip ViT nor a CNN with a "
        "blocks/_blocks/stages list; give the tower an adapter_stages() method"
    )


def _probe_cnn_blocks(
    tower: nn.Module, blocks: list[nn.Module], size: int
) -> list[tuple[int, int, int] | None]:
    """(c_in, c_out, stride) of each block from one probe forward (None: not a 4-D map block)."""
    shapes: dict[int, tuple[torch.Size, torch.Size]] = {}
    handles = []
    for i, b in enumerate(blocks):

        def hook(_m, inp, out, i=i):
            if inp and torch.is_tensor(inp[0]) and torch.is_tensor(out):
                shapes[i] = (inp[0].shape, out.shape)

        handles.append(b.register_forward_hook(hook))
    p = next(tower.parameters())
    x = torch.zeros(1, 3, size, size, device=p.device, dtype=p.dtype)
    was_training = tower.training
    tower.eval()
    try:
        with torch.no_grad():
            fwd = getattr(tower, "forward_multiscale", tower.forward)
            fwd(x)
    finally:
        for h in handles:
            h.remove()
        tower.train(was_training)
    out: list[tuple[int, int, int] | None] = []
    for i in range(len(blocks)):
        if i not in shapes or len(shapes[i][0]) != 4 or len(shapes[i][1]) != 4:
            out.append(None)
            continue
        (_, ci, hi, _), (_, co, ho, _) = shapes[i]
        out.append((ci, co, max(1, round(hi / ho))))
    return out


def add_adapters(
    model: nn.Module, cfg: AdapterConfig | None = None, probe_size: int = 64
) -> AdapterInfo:
    """Freeze every parameter of ``model`` and add trainable bypasses to its image tower.

    Returns (and logs) the adapter count and the trainable / total parameter counts. The model's
    outputs are unchanged until the adapters are trained (zero-initialised up-projections).
    """
    cfg = cfg or AdapterConfig()
    if any(is_adapter_param(n) for n, _ in model.named_parameters()):
        raise ValueError("add_adapters: the model already has adapters")
    for p in model.parameters():
        p.requires_grad_(False)
    tower = image_tower(model)
    vit = _find_vit(tower)
    ref = next(model.parameters())
    if vit is not None:
        kind = "convpass"
        grid = tuple(getattr(vit, "grid_size", (14, 14)))
        batch_first = getattr(vit.transformer, "batch_first", True)
        blocks = list(vit.transformer.resblocks)
        for b in blocks:
            attach_convpass_to_block(
                b, vit.transformer.width, cfg.hidden, grid, cfg.scale, batch_first
            )
        n = 2 * len(blocks)
    else:
        kind = "conv_bypass"
        blocks = _find_cnn_blocks(tower)
        bypasses = nn.ModuleList()
        shapes = _probe_cnn_blocks(tower, blocks, probe_size)
        for i, (b, shape) in enumerate(zip(blocks, shapes)):
            if shape is None or i < cfg.cnn_skip_stages:
                continue
            c_in, c_out, stride = shape
            bypasses.append(ConvBypass(c_in, c_out, cfg.hidden, stride, cfg.scale))
            attach_stage_bypass(b, bypasses[-1])
        # Owned by the tower (not the stages): names read image_tower.conv_bypass.N.*
        tower.conv_bypass = bypasses
        n = len(bypasses)
    model.to(device=ref.device)
    for name, p in model.named_parameters():
        if is_adapter_param(name):
            p.requires_grad_(True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    info = AdapterInfo(kind, n, trainable, total)
    log.info("add_adapters: %s", info)
    return info


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors of ``model`` (what an adapted checkpoint stores)."""
    return {k: v for k, v in model.state_dict().items() if is_adapter_param(k)}


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Run ``model`` as the frozen original (for the open-vocabulary branch, FC-CLIP style)."""
    mods = [m for m in model.modules() if isinstance(m, (Convpass, ConvBypass))]
    old = [m.scale for m in mods]
    try:
        for m in mods:
            m.scale = 0.0
        yield
    finally:
        for m, s in zip(mods, old):
            m.scale = s
