"""Run under torchrun (2 gloo processes) or alone: C14 / C15 equivalence data for test_train.

Each rank takes its part of a fixed global batch (uneven region counts), runs two optimizer steps
of the micro model through PretrainModule + UMGLoss (step 1 without any box: the region head is
unused, C15) and rank 0 writes losses, first-step gradients and final weights to OUT.
"""

from __future__ import annotations

import os
import sys

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from _train_micro import build_micro
from umgclip.data.loader import Batch
from umgclip.losses import LossConfig, UMGLoss
from umgclip.train.config import OptimConfig
from umgclip.train.distributed import init_distributed
from umgclip.train.pretrain import PretrainModule, forward_loss, make_optimizer


def global_batch(step: int) -> list[dict]:
    g = torch.Generator().manual_seed(100 + step)
    items = []
    for i in range(6):
        k = 0 if step == 0 else [3, 1, 2, 0, 2, 1][i]
        boxes = torch.tensor([[4.0 + 3 * j, 6.0, 40.0 + 2 * j, 50.0] for j in range(k)]).reshape(
            k, 4
        )
        tags = [["red", "square"], ["blue"], ["red"], [], ["green", "disc"], ["blue", "disc"]][i]
        items.append(
            dict(
                image=torch.randn(3, 64, 64, generator=g),
                caption=["a red square", "a blue disc", "a red square", "two shapes", "x", "y"][i],
                tags=tags if step else [],
                boxes=boxes,
                region_tags=[[["red"], ["disc"]][j % 2] for j in range(k)],
                region_texts=[["a photo of a red.", "a disc"][j % 2] for j in range(k)],
            )
        )
    return items


def to_batch(items: list[dict]) -> Batch:
    return Batch(
        images=torch.stack([it["image"] for it in items]),
        keys=[str(i) for i in range(len(items))],
        captions=[it["caption"] for it in items],
        all_captions=[[it["caption"]] for it in items],
        tags=[it["tags"] for it in items],
        boxes=[it["boxes"] for it in items],
        region_tags=[it["region_tags"] for it in items],
        region_texts=[it["region_texts"] for it in items],
        masks=None,
    )


def main(out: str) -> None:
    dinfo = init_distributed("cpu")
    model, _ = build_micro()
    module = PretrainModule(model)
    if dinfo.distributed:
        module = DDP(module, find_unused_parameters=True)
    opt = make_optimizer(model, OptimConfig(lr=1e-2, weight_decay=0.1), dinfo.device)
    for g in opt.param_groups:
        g["lr"] = g["base_lr"]
    loss_fn = UMGLoss(LossConfig())
    record: dict = {"loss": [], "grads": {}}
    per = 6 // dinfo.world_size
    for step in range(2):
        items = global_batch(step)[dinfo.rank * per : (dinfo.rank + 1) * per]
        opt.zero_grad(set_to_none=True)
        res = forward_loss(module, to_batch(items), loss_fn, model.tokenizer, dinfo.device, False)
        res["loss"].backward()
        record["loss"].append({k: v.detach().clone() for k, v in res.items()})
        if step == 0:
            record["grads"] = {
                n: (p.grad.clone() if p.grad is not None else None)
                for n, p in model.named_parameters()
            }
        opt.step()
    record["weights"] = {k: v.clone() for k, v in model.state_dict().items()}
    if dinfo.rank == 0:
        torch.save(record, out)
    if dinfo.distributed:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main(sys.argv[1])
