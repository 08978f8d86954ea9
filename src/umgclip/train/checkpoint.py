"""Atomic, resumable training checkpoints.

Layout (docs/architecture.md): ``RUN/checkpoints/step_N/`` = the model folder written by the
model's ``save_pretrained`` (``model.safetensors`` + ``config.json``) plus ``train_state.pt``
(optimizer, schedule, step, RNG states, data position). A checkpoint is written into
``.step_N.tmp`` and renamed into place, so a run killed mid-write never leaves a half checkpoint
that ``--resume`` would pick up. ``train_state.pt`` holds only tensors and primitive containers,
so it loads with ``torch.load(weights_only=True)`` (C25): no arbitrary pickles.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

log = logging.getLogger(__name__)

STATE_FILE = "train_state.pt"
WEIGHTS_FILE = "model.safetensors"
_STEP_RE = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not fit the run."""


# ------------------------------------------------------------------------------------ RNG state


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states as tensors / primitives (weights_only-loadable)."""
    py = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`rng_state`."""
    v, keys, gauss = state["python"]
    random.setstate((v, tuple(keys), gauss))
    n = state["numpy"]
    np.random.set_state(
        (
            n["kind"],
            n["keys"].numpy().astype(np.uint32),
            n["pos"],
            n["has_gauss"],
            n["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------- save / load


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and (p / STATE_FILE).is_file() and (p / WEIGHTS_FILE).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def save_checkpoint(
    run_dir: str | Path, step: int, model: torch.nn.Module, state: dict[str, Any], keep_last: int
) -> Path:
    """Write ``checkpoints/step_{step}`` atomically and prune to the newest ``keep_last``."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step}"
    tmp = root / f".step_{step}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    torch.save(state, tmp / STATE_FILE)
    if final.exists():  # the same step saved again (e.g. the end-of-run save right after one)
        shutil.rmtree(final)
    os.replace(tmp, final)
    if keep_last > 0:
        for old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    log.info("checkpoint saved: %s", final)
    return final


def load_train_state(ckpt: str | Path) -> dict[str, Any]:
    """The ``train_state.pt`` of a checkpoint folder, loaded with ``weights_only=True``."""
    path = Path(ckpt) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{ckpt} is not a complete checkpoint (no {STATE_FILE})")
    return torch.load(path, map_location="cpu", weights_only=True)


def load_model_weights(model: torch.nn.Module, ckpt: str | Path) -> None:
    """Load a checkpoint's safetensors weights into ``model`` in place (strict)."""
    path = Path(ckpt) / WEIGHTS_FILE
    if not path.is_file():
        raise CheckpointError(f"{ckpt} has no {WEIGHTS_FILE}")
    sd = load_file(str(path), device="cpu")
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


def resolve_resume(resume: str | None, run_dir: Path) -> Path | None:
    """``--resume`` without a path means the run folder's latest checkpoint."""
    if resume is None:
        return None
    if resume == "latest":
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            raise CheckpointError(f"--resume: no complete checkpoint under {run_dir}/checkpoints")
        return ckpt
    p = Path(resume)
    if (p / STATE_FILE).is_file():
        return p
    ckpt = latest_checkpoint(p)
    if ckpt is None:
        raise CheckpointError(f"--resume {p}: neither a checkpoint nor a run folder with one")
    return ckpt
