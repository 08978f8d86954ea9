"""Training-step and inference benchmark of the umgclip ViT towers against open_clip.

One run measures, at bf16 autocast with random weights (default ViT-B/16, 224 px, batch 32):

* the CLIP training step (forward, symmetric image-text InfoNCE, backward, fused AdamW) of
  open_clip's own model, of ours without and with token clustering (keep 0.25), and of open_clip
  with FLIP patch dropout 0.75, each as a speed-up over open_clip's full step;
* the image tower alone (forward + backward) for the same variants;
* achieved GFLOP/s (FLOPs counted with ``torch.utils.flop_counter`` on a small batch and scaled)
  and the fraction of this machine's bf16 matmul peak, measured in the same run;
* ``encode_image`` images/s with a bf16 copy of the model under ``torch.no_grad``.

    python benchmarks/bench_model.py                       # the full run (minutes on 2 cores)
    python benchmarks/bench_model.py --model umg-vit-tiny --batch 8 --steps 2   # smoke run
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def matmul_peak_gflops(n: int = 4096, reps: int = 5) -> float:
    """Best bf16 GEMM throughput over ``reps`` runs of an ``n x n x n`` matmul."""
    a = torch.randn(n, n, dtype=torch.bfloat16)
    b = torch.randn(n, n, dtype=torch.bfloat16)
    a @ b  # warm-up (weight packing, thread pool)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def timed(fn: Callable[[], None], steps: int, warmup: int) -> float:
    """Median seconds per call after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def count_flops(fn: Callable[[], None]) -> int:
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


class Variant:
    """A model + how to get normalised image/text features from it."""

    def __init__(self, name: str, model: torch.nn.Module, ours: bool) -> None:
        self.name, self.model, self.ours = name, model, ours

    def image(self, x: torch.Tensor) -> torch.Tensor:
        if self.ours:
            return self.model.encode_image(x)
        return self.model.encode_image(x, normalize=True)

    def text(self, ids: torch.Tensor) -> torch.Tensor:
        if self.ours:
            return self.model.encode_text(ids)
        return self.model.encode_text(ids, normalize=True)

    def scale(self) -> torch.Tensor:
        if self.ours:
            return self.model.logit_scale_value()
        return self.model.logit_scale.exp().clamp(max=100)


def build_variants(name: str) -> list[Variant]:
    import open_clip

    import umgclip
    from umgclip.model.registry import get_model_config

    cfg = get_model_config(name)

    def oc(patch_dropout: float = 0.0) -> torch.nn.Module:
        vc = dict(cfg.image.open_clip, patch_dropout=patch_dropout)
        return open_clip.model.CLIP(cfg.embed_dim, vc, cfg.text.open_clip, cfg.quick_gelu)

    torch.manual_seed(0)
    ours_off = umgclip.create_model(name)
    ours_off.set_token_clustering(False)
    ours_on = umgclip.create_model(name)
    ours_on.set_token_clustering(True)
    keep = cfg.clustering.keep
    return [
        Variant("open_clip (full)", oc(), ours=False),
        Variant("umgclip, clustering off", ours_off, ours=True),
        Variant(f"umgclip, clustering keep {keep:g}", ours_on, ours=True),
        Variant("open_clip + FLIP patch dropout 0.75", oc(0.75), ours=False),
    ]


def bench(args: argparse.Namespace) -> dict:
    import umgclip
    from umgclip.model.registry import get_model_config

    torch.set_num_threads(args.threads)
    cfg = get_model_config(args.model)
    size = cfg.preprocess.size
    tok = umgclip.get_tokenizer(args.model)
    gen = torch.Generator().manual_seed(0)
    words = ["a", "dog", "cat", "red", "photo", "of", "on", "the", "street", "two", "people"]

    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, 3, size, size, generator=gen)
        caps = [
            " ".join(words[int(i)] for i in torch.randint(len(words), (12,), generator=gen))
            for _ in range(n)
        ]
        return x, tok(caps)

    load_start = os.getloadavg()[0]
    peak = matmul_peak_gflops()
    x, ids = batch(args.batch)
    xs, ids_s = batch(2)
    rows = []
    for v in build_variants(args.model):
        model = v.model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
        labels = torch.arange(args.batch)

        def step(xb=x, tb=ids, lb=labels, v=v, opt=opt) -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                img, txt = v.image(xb), v.text(tb)
                logits = v.scale() * img.float() @ txt.float().T
                loss = (F.cross_entropy(logits, lb) + F.cross_entropy(logits.T, lb)) / 2
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        def image_only(xb=x, v=v) -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = v.image(xb).float().square().mean()
            loss.backward()
            v.model.zero_grad(set_to_none=True)

        t_step = timed(step, args.steps, args.warmup)
        t_img = timed(image_only, args.steps, args.warmup)

        # FLOPs are linear in the batch: count on 2 samples (no optimizer step) and scale.
        def fwd_bwd_small(v=v, small_labels=torch.arange(2)) -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                img, txt = v.image(xs), v.text(ids_s)
                logits = v.scale() * img.float() @ txt.float().T
                loss = F.cross_entropy(logits, small_labels)
            loss.backward()
            v.model.zero_grad(set_to_none=True)

        flops = count_flops(fwd_bwd_small) * args.batch / 2
        del opt
        rows.append({"variant": v.name, "step_s": t_step, "image_fwd_bwd_s": t_img, "flops": flops})
        print(f"  {v.name}: step {t_step:.3f}s, image tower fwd+bwd {t_img:.3f}s", flush=True)

    # Inference: a bf16 copy of the model, no_grad (DESIGN 7), clustering off as in eval.
    infer = {}
    for v in build_variants(args.model)[:2]:
        m = copy.deepcopy(v.model).eval().to(torch.bfloat16)
        xb = x.to(torch.bfloat16)

        def enc(m=m, xb=xb, v=v) -> None:
            with torch.no_grad():
                (m.encode_image(xb) if v.ours else m.encode_image(xb, normalize=True))

        infer[v.name] = args.batch / timed(enc, args.steps, 1)
    ref = rows[0]
    for r in rows:
        r["step_speedup"] = ref["step_s"] / r["step_s"]
        r["image_speedup"] = ref["image_fwd_bwd_s"] / r["image_fwd_bwd_s"]
        r["gflops_per_s"] = r["flops"] / r["step_s"] / 1e9
        r["peak_fraction"] = r["gflops_per_s"] / peak
    return {
        "load_average_1min_start": load_start,
        "load_average_1min_end": os.getloadavg()[0],
        "model": args.model,
        "batch": args.batch,
        "image_size": size,
        "threads": args.threads,
        "bf16_matmul_peak_gflops": peak,
        "train": rows,
        "encode_image_img_per_s": infer,
    }


def render(res: dict) -> str:
    lines = [
        f"model {res['model']}, {res['image_size']} px, batch {res['batch']}, bf16 autocast, "
        f"{res['threads']} threads; bf16 matmul peak {res['bf16_matmul_peak_gflops']:.0f} GFLOP/s; "
        f"machine load average {res['load_average_1min_start']:.1f} -> "
        f"{res['load_average_1min_end']:.1f} (2 cores: > 2 means other work shared the CPU)",
        "",
        "| variant | step (s) | speed-up vs open_clip | image tower fwd+bwd (s) | speed-up "
        "| GFLOP/s | of peak |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in res["train"]:
        lines.append(
            f"| {r['variant']} | {r['step_s']:.3f} | {r['step_speedup']:.2f}x | "
            f"{r['image_fwd_bwd_s']:.3f} | {r['image_speedup']:.2f}x | "
            f"{r['gflops_per_s']:.0f} | {100 * r['peak_fraction']:.0f}% |"
        )
    lines.append("")
    for k, v in res["encode_image_img_per_s"].items():
        lines.append(f"encode_image, bf16 copy, no_grad, {k}: {v:.1f} img/s")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="umg-vit-b16")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant (median)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args()
    res = bench(args)
    print(render(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
