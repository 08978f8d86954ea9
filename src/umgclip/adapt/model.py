"""``AdaptedModel``: a frozen UMG-CLIP backbone with adapters + a task decoder, and its checkpoint
(only adapter + decoder weights in safetensors, plus a hashed reference to the backbone)."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from umgclip.adapt.adapters import adapter_state_dict, adapters_disabled, add_adapters
from umgclip.adapt.config import AdaptConfig
from umgclip.adapt.data import ClassVocab
from umgclip.adapt.openvocab import geometric_ensemble, mask_pool, out_vocab_probs
from umgclip.config import from_dict, to_dict
from umgclip.model.decoders.panoptic import PanopticDecoder, PanopticResult, panoptic_inference
from umgclip.model.decoders.semantic import SemanticDecoder

log = logging.getLogger(__name__)

ADAPTED_WEIGHTS = "adapted.safetensors"
ADAPTED_META = "adapted.json"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@torch.no_grad()
def class_embeddings(model: nn.Module, names: list[str], device: torch.device) -> torch.Tensor:
    """(K, D) prompt-ensemble text embeddings of class names (the evaluator's templates)."""
    from umgclip.eval.vocab import TEMPLATES, prompt_name

    texts = [t.format(prompt_name(n)) for n in names for t in TEMPLATES]
    out = []
    for i in range(0, len(texts), 256):
        out.append(model.encode_text(model.tokenizer(texts[i : i + 256]).to(device)).float())
    emb = torch.cat(out).reshape(len(names), len(TEMPLATES), -1).mean(1)
    return F.normalize(emb, dim=-1)


class AdaptedModel(nn.Module):
    """Backbone (frozen, with adapters) + decoder. ``forward(x)`` returns the decoder output."""

    def __init__(
        self, backbone: nn.Module, cfg: AdaptConfig, vocab: ClassVocab, class_emb: torch.Tensor
    ):
        super().__init__()
        self.backbone = backbone
        self.cfg = cfg
        self.vocab = vocab
        self.adapter_info = add_adapters(backbone, cfg.adapter, probe_size=cfg.data.size)
        self.register_buffer("class_emb", class_emb.float().clone(), persistent=False)
        dev = class_emb.device
        with torch.no_grad():
            probe = torch.zeros(1, 3, cfg.data.size, cfg.data.size, device=dev)
            chans = [f.shape[1] for f in backbone.image_tower.forward_multiscale(probe)]
        d = cfg.decoder
        if cfg.task == "semseg":
            self.decoder: nn.Module = SemanticDecoder(chans, len(vocab.names), d.dim)
        else:
            self.decoder = PanopticDecoder(
                chans, class_emb.shape[1], d.dim, d.num_queries, d.layers, d.heads, d.memory_levels
            )
        self.decoder.to(dev)

    def train(self, mode: bool = True) -> AdaptedModel:
        # The frozen backbone always runs in eval mode (BatchNorm statistics stay as trained).
        super().train(mode)
        self.backbone.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def param_counts(self) -> dict[str, int]:
        dec = sum(p.numel() for p in self.decoder.parameters())
        return {
            "adapter": self.adapter_info.trainable,
            "decoder": dec,
            "trainable": sum(p.numel() for p in self.trainable_parameters()),
            "backbone_total": self.adapter_info.total,
            "total": sum(p.numel() for p in self.parameters()),
        }

    def forward(self, x: torch.Tensor) -> Any:
        feats = self.backbone.image_tower.forward_multiscale(x)
        if self.cfg.task == "semseg":
            return self.decoder(feats)
        return self.decoder(feats, self.class_emb)

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def frozen_dense(self, x: torch.Tensor) -> torch.Tensor:
        """Dense embeddings of the original backbone (adapters off), (B,D,h,w)."""
        with adapters_disabled(self.backbone):
            return self.backbone.encode_dense(x)

    @torch.no_grad()
    def class_probs(
        self, x: torch.Tensor, out: dict[str, torch.Tensor], open_vocab: bool
    ) -> torch.Tensor:
        """(B,Q,K+1) class probabilities; with ``open_vocab`` the FC-CLIP geometric ensemble."""
        p_in = out["pred_logits"].float().softmax(-1)
        if not open_vocab:
            return p_in
        pooled = mask_pool(self.frozen_dense(x).float(), out["pred_masks"])
        scale = (
            float(self.backbone.logit_scale_value())
            if hasattr(self.backbone, "logit_scale_value")
            else 100.0
        )
        p_out = out_vocab_probs(pooled, self.class_emb, scale)
        seen = torch.tensor(self.vocab.seen, device=p_in.device)
        inf = self.cfg.inference
        return geometric_ensemble(p_in, p_out, seen, inf.alpha_seen, inf.beta_unseen)

    @torch.no_grad()
    def predict_panoptic_batch(
        self, x: torch.Tensor, open_vocab: bool | None = None, out: dict | None = None
    ) -> list[PanopticResult]:
        """Panoptic results at the input resolution for a normalised batch."""
        if self.cfg.task != "panoptic":
            raise ValueError("this adapted model was trained for semseg, not panoptic")
        ov = self.cfg.inference.open_vocab if open_vocab is None else open_vocab
        out = out if out is not None else self(x)
        probs = self.class_probs(x, out, ov)
        masks = F.interpolate(
            out["pred_masks"].float(), size=x.shape[-2:], mode="bilinear", align_corners=False
        )
        thing = torch.tensor(self.vocab.is_thing, device=x.device)
        inf = self.cfg.inference
        return [
            panoptic_inference(p, m, thing, inf.object_threshold, inf.overlap_threshold)
            for p, m in zip(probs, masks)
        ]

    # ------------------------------------------------------------------ checkpoint
    def save(self, out_dir: str | Path, backbone_dir: str | Path) -> Path:
        """Write only adapter + decoder weights and a hashed reference to ``backbone_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {f"backbone.{k}": v for k, v in adapter_state_dict(self.backbone).items()}
        tensors.update({f"decoder.{k}": v for k, v in self.decoder.state_dict().items()})
        tensors["class_emb"] = self.class_emb
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in tensors.items()},
            str(out / ADAPTED_WEIGHTS),
        )
        bdir = Path(backbone_dir).resolve()
        meta = {
            "format": "umgclip-adapted/1",
            "backbone": {"path": str(bdir), "sha256": file_sha256(bdir / "model.safetensors")},
            "config": to_dict(self.cfg),
            "vocab": {
                "category_ids": self.vocab.category_ids,
                "names": self.vocab.names,
                "is_thing": self.vocab.is_thing,
                "holdout": self.vocab.holdout,
            },
            "params": self.param_counts(),
        }
        (out / ADAPTED_META).write_text(json.dumps(meta, indent=1))
        return out


def load_adapted(
    path: str | Path, device: str = "cpu", backbone_dir: str | Path | None = None
) -> AdaptedModel:
    """Rebuild an :class:`AdaptedModel` from :meth:`AdaptedModel.save` output.

    The backbone is loaded from the recorded path (or ``backbone_dir``) and must match the
    recorded content hash: adapters trained on one backbone are meaningless on another.
    """
    import umgclip

    p = Path(path)
    meta = json.loads((p / ADAPTED_META).read_text())
    bdir = Path(backbone_dir or meta["backbone"]["path"])
    if not (bdir / "model.safetensors").is_file():
        raise FileNotFoundError(f"backbone checkpoint {bdir} (referenced by {p}) not found")
    got = file_sha256(bdir / "model.safetensors")
    if got != meta["backbone"]["sha256"]:
        raise ValueError(
            f"backbone {bdir} has hash {got[:12]}..., the adapters were trained on "
            f"{meta['backbone']['sha256'][:12]}..."
        )
    cfg = from_dict(AdaptConfig, meta["config"])
    backbone = (
        umgclip.load_model(bdir, device=device) if _accepts_device() else umgclip.load_model(bdir)
    )
    backbone.to(device).eval()
    vocab = ClassVocab(**meta["vocab"])
    tensors = load_file(str(p / ADAPTED_WEIGHTS), device=str(device))
    model = AdaptedModel(backbone, cfg, vocab, tensors.pop("class_emb"))
    bb = {k[len("backbone.") :]: v for k, v in tensors.items() if k.startswith("backbone.")}
    dec = {k[len("decoder.") :]: v for k, v in tensors.items() if k.startswith("decoder.")}
    missing, unexpected = model.backbone.load_state_dict(bb, strict=False)
    if unexpected or any(
        k.startswith(("convpass", "conv_bypass")) or "convpass_" in k or "conv_bypass" in k
        for k in missing
    ):
        raise ValueError(f"adapter weights do not fit the backbone: unexpected={unexpected[:5]}")
    model.decoder.load_state_dict(dec, strict=True)
    return model.eval()


def _accepts_device() -> bool:
    import inspect

    import umgclip

    return "device" in inspect.signature(umgclip.load_model).parameters
