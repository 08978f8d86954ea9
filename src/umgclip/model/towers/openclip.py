"""open_clip ViT towers (``umg-vit-*``): open_clip's own modules, wrapped.

We build open_clip's ``VisionTransformer`` / ``TextTransformer`` from a (fully materialised)
model config and only replace the vision *forward* so it can (a) return the patch tokens as a
dense map and (b) run token clustering between blocks. Every block is still open_clip's, called
as open_clip calls it, so adapters that wrap blocks keep working.

Dense map choice: the patch tokens after the last block go through ``ln_post`` and ``proj``
(the same head as the class token). We do not use the "v-v / no final attention" trick
(MaskCLIP/SCLIP): UMG-CLIP trains region-text alignment on exactly these tokens, so the plain
path is what its losses shape; the trick could be added as a config switch later.
"""

from __future__ import annotations

from typing import Any

import torch

from umgclip.model.model_config import ClusteringConfig
from umgclip.model.token_clustering import (
    cluster_tokens,
    proportional_attention_mask,
    unfold_tokens,
)
from umgclip.model.towers.base import ImageTower, TextTower


class OpenCLIPVisionTower(ImageTower):
    """open_clip ``VisionTransformer`` + optional token clustering; head = ``ln_post`` + ``proj``."""

    def __init__(
        self,
        vision_cfg: dict[str, Any],
        embed_dim: int,
        quick_gelu: bool,
        clustering: ClusteringConfig,
    ) -> None:
        super().__init__()
        from open_clip.model import CLIPVisionCfg, _build_vision_tower

        vc = CLIPVisionCfg(**vision_cfg)
        unsupported = {
            "timm_model_name": vc.timm_model_name,
            "attentional_pool": vc.attentional_pool,
            "final_ln_after_pool": vc.final_ln_after_pool,
            "patch_dropout": vc.patch_dropout,
        }
        bad = {k: v for k, v in unsupported.items() if v}
        if bad or vc.pool_type != "tok":
            raise ValueError(
                f"open_clip vision config not supported for dense outputs: {bad}, "
                f"pool_type={vc.pool_type!r} (need 'tok', no attn pool, no patch dropout)"
            )
        self.visual = _build_vision_tower(embed_dim, vc, quick_gelu)
        if not self.visual.transformer.batch_first:
            raise ValueError("open_clip transformer must be batch_first")
        self.width = vc.width
        self.stride = self.visual.patch_size[0]
        self.heads = vc.width // vc.head_width
        self.clustering = clustering
        self.cluster_enabled = False
        n_blocks = len(self.visual.transformer.resblocks)
        if not 1 <= clustering.cluster_after < n_blocks:
            raise ValueError(
                f"clustering.cluster_after {clustering.cluster_after} outside [1, {n_blocks}): "
                "clustering runs after that many blocks and needs at least one block after it"
            )

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(self.visual.grid_size)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        x = self._check_input(x)
        want = tuple(self.visual.image_size)
        if tuple(x.shape[-2:]) != want:
            raise ValueError(
                f"this ViT takes {want[0]}x{want[1]} images (fixed position embedding), "
                f"got {x.shape[-2]}x{x.shape[-1]}"
            )
        return self.visual._embeds(x)

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 1+N, W)`` tokens after the last block (clusters unfolded), before ``ln_post``."""
        x = self._embed(x)
        blocks = self.visual.transformer.resblocks
        if not self.cluster_enabled:
            return self.visual.transformer(x)
        c = self.clustering
        for blk in blocks[: c.cluster_after]:
            x = blk(x)
        merged, clusters = cluster_tokens(x[:, 1:], self.grid_size, c.keep, c.k, c.window)
        x = torch.cat([x[:, :1], merged], dim=1)
        mask = proportional_attention_mask(clusters.sizes, self.heads).to(x.dtype)
        for blk in blocks[c.cluster_after :]:
            x = blk(x, attn_mask=mask)
        return torch.cat([x[:, :1], unfold_tokens(x[:, 1:], clusters)], dim=1)

    def _to_map(self, patches: torch.Tensor) -> torch.Tensor:
        b, n, w = patches.shape
        gh, gw = self.grid_size
        return patches.transpose(1, 2).reshape(b, w, gh, gw)

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.forward_tokens(x)
        return tokens[:, 0], self._to_map(tokens[:, 1:])

    def forward_pooled(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_tokens(x)[:, 0]

    def head(self, feats: torch.Tensor) -> torch.Tensor:
        out = self.visual.ln_post(feats)
        return out @ self.visual.proj if self.visual.proj is not None else out

    def forward_multiscale(self, x: torch.Tensor, n: int = 4) -> list[torch.Tensor]:
        """Patch-token maps after ``n`` evenly spaced blocks (last included), all at the patch
        stride (a ViT has one scale; decoders resample as ViTDet does). No clustering."""
        x = self._embed(x)
        blocks = self.visual.transformer.resblocks
        depth = len(blocks)
        taps = {round(depth * (i + 1) / n) - 1 for i in range(n)}
        maps = []
        for i, blk in enumerate(blocks):
            x = blk(x)
            if i in taps:
                maps.append(self._to_map(x[:, 1:]))
        return maps


class OpenCLIPTextTower(TextTower):
    """open_clip ``TextTransformer`` (causal, EOT-argmax pooling, projection)."""

    def __init__(self, text_cfg: dict[str, Any], embed_dim: int, quick_gelu: bool) -> None:
        super().__init__()
        from open_clip.model import CLIPTextCfg, _build_text_tower

        self.text = _build_text_tower(embed_dim, CLIPTextCfg(**text_cfg), quick_gelu)
        self.context_length = self.text.context_length

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.text(ids)


#: Keys of an open_clip ``CLIP`` state dict that belong to the text tower.
_TEXT_KEYS = (
    "token_embedding",
    "positional_embedding",
    "transformer",
    "ln_final",
    "text_projection",
)


def map_open_clip_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an open_clip ``CLIP`` / ``CustomTextCLIP`` state dict to ``UMGCLIP`` names."""
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k.startswith("module."):
            k = k[len("module.") :]
        if k.startswith("visual."):
            out["image_tower." + k] = v
        elif k.startswith("text."):
            out["text_tower." + k] = v
        elif k.split(".", 1)[0] in _TEXT_KEYS:
            out["text_tower.text." + k] = v
        elif k == "logit_scale":
            out[k] = v.reshape(())
        elif k == "attn_mask":
            continue  # a non-persistent buffer in current open_clip; rebuilt from the config
        else:
            out[k] = v  # left for load_state_dict(strict=True) to report
    return out
