"""Helpers for the training tests: a micro stand-in CLIP with the UMGCLIP training interface and
synthetic shards. Importable by torchrun workers (the tests put this folder on PYTHONPATH)."""

from __future__ import annotations

import io
import json
import random
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from safetensors.torch import save_file
from torch import nn
from torchvision.ops import roi_align

from umgclip.config import PreprocessConfig
from umgclip.data.schema import Region, Sample
from umgclip.data.shards import ShardWriter

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
SHAPES = ("square", "disc")


class MicroTokenizer:
    context_length = 12
    truncate = True

    def __call__(self, texts):
        texts = [texts] if isinstance(texts, str) else texts
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for i, t in enumerate(texts):
            ids = [1 + zlib.crc32(w.encode()) % 254 for w in t.lower().split()]
            ids = ids[: self.context_length]
            out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out


class MicroCLIP(nn.Module):
    """64 px CNN image tower with a dense map, bag-of-words text tower, shared projection.

    ``region_head`` is used only when the batch has boxes: the C15 "sometimes unused" parameter.
    """

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.image_tower = nn.ModuleDict(
            {
                "stem": nn.Conv2d(3, 16, 4, stride=4),
                "body": nn.Conv2d(16, 32, 3, stride=2, padding=1),
                "norm": nn.GroupNorm(4, 32),
                "proj": nn.Linear(32, dim),
            }
        )
        self.region_head = nn.Linear(32, 32)
        self.text_tower = nn.ModuleDict(
            {
                "embed": nn.EmbeddingBag(256, 48, mode="mean", padding_idx=0),
                "proj": nn.Linear(48, dim),
            }
        )
        self.logit_scale = nn.Parameter(torch.tensor(2.0))
        self.tokenizer = MicroTokenizer()
        self.preprocess_cfg = PreprocessConfig(size=64, resize_mode="squash")

    def _dense(self, x):
        t = self.image_tower
        return t["norm"](F.gelu(t["body"](F.gelu(t["stem"](x)))))

    def forward_train(self, images, boxes=None):
        dense = self._dense(images)
        out = {"image": F.normalize(self.image_tower["proj"](dense.mean((2, 3))), dim=-1)}
        if boxes is not None:
            feats = roi_align(dense, [b.to(dense.dtype) for b in boxes], 2, 1 / 8, aligned=True)
            feats = self.region_head(feats.mean((2, 3))) if len(feats) else feats.mean((2, 3))
            out["regions"] = F.normalize(self.image_tower["proj"](feats), dim=-1)
        return out

    def encode_text(self, tokens, normalize=True):
        e = self.text_tower["proj"](self.text_tower["embed"](tokens))
        return F.normalize(e, dim=-1) if normalize else e

    def logit_scale_value(self):
        return self.logit_scale.float().exp().clamp(max=100)

    def save_pretrained(self, out_dir):
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_file(
            {k: v.contiguous() for k, v in self.state_dict().items()}, out / "model.safetensors"
        )
        (out / "config.json").write_text(json.dumps({"name": "micro"}))
        return out


def build_micro(name="micro", pretrained=None, device="cpu"):
    torch.manual_seed(1234)
    m = MicroCLIP().to(device)
    return m, m.preprocess_cfg


def make_shards(out: Path, n: int = 24, per_shard: int = 8, seed: int = 0) -> Path:
    """Synthetic images: coloured shapes with captions, tags and boxes (duplicates on purpose)."""
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    with ShardWriter(out, prefix="train", max_samples=per_shard) as w:
        for i in range(n):
            img = Image.new("RGB", (96, 80), (200, 200, 200))
            d = ImageDraw.Draw(img)
            regions, tags = [], []
            for _ in range(rng.randint(1, 3)):
                c, s = rng.choice(list(COLOURS)), rng.choice(SHAPES)
                x0, y0 = rng.randint(0, 60), rng.randint(0, 44)
                box = [x0, y0, x0 + 30, y0 + 30]
                (d.rectangle if s == "square" else d.ellipse)(box, fill=COLOURS[c])
                regions.append(
                    Region(
                        box=box, tags=[c, s], caption=f"a {c} {s}" if rng.random() < 0.5 else None
                    )
                )
                tags += [c, s]
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=90)
            caption = " and ".join(f"a {r.tags[0]} {r.tags[1]}" for r in regions)
            sample = Sample(
                key=f"s{i:04d}",
                width=96,
                height=80,
                captions=[caption, f"shapes: {caption}"],
                tags=sorted(set(tags)),
                regions=regions,
                split="train",
            )
            w.write(sample, buf.getvalue())
    return out
