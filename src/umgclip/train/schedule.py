"""Learning-rate schedule: linear warmup then cosine decay, resumable and re-targetable.

Hand-written rather than ``torch.optim.lr_scheduler.LambdaLR`` + ``SequentialLR`` because two
things must be explicit and exact here: (1) its whole state is primitives, so it lives in a
``weights_only`` train state (C25); (2) changing the run's length on resume re-derives the cosine
from the current step and LR factor (``rebase``) instead of jumping to wherever the new curve is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class ScheduleConfig:
    """``steps`` (optimizer steps) wins when > 0; else ``epochs`` x steps per epoch.

    ``allow_length_change``: on ``--resume`` with a different total length, rebase the cosine at
    the resume step (no LR jump) instead of refusing to start.
    """

    steps: int = 0
    epochs: float = 0.0
    warmup_steps: int = 0
    warmup_fraction: float = 0.0
    min_lr_ratio: float = 0.0
    allow_length_change: bool = False


class ScheduleLengthError(ValueError):
    """A resumed run asks for another total length without ``allow_length_change``."""


class WarmupCosine:
    """Sets ``group['lr'] = group['base_lr'] * factor(step)`` on every param group.

    ``factor``: ``(step+1)/warmup`` during warmup, then cosine from 1 to ``min_ratio`` at
    ``total``. After ``rebase(step, new_total)``: cosine from the factor at ``step`` down to
    ``min_ratio`` at ``new_total``.
    """

    def __init__(self, total: int, warmup: int = 0, min_ratio: float = 0.0) -> None:
        if total <= 0:
            raise ValueError(f"schedule length must be > 0 steps, got {total}")
        if not 0 <= warmup < total:
            raise ValueError(f"warmup ({warmup}) must be in [0, total={total})")
        self.total, self.warmup, self.min_ratio = int(total), int(warmup), float(min_ratio)
        self.rebase_step: int = -1
        self.rebase_factor: float = 1.0

    def _cos(self, start: int, f0: float, step: int) -> float:
        span = max(1, self.total - start)
        t = min(1.0, max(0.0, (step - start) / span))
        return self.min_ratio + (f0 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    def factor(self, step: int) -> float:
        if self.rebase_step >= 0 and step >= self.rebase_step:
            return self._cos(self.rebase_step, self.rebase_factor, step)
        if step < self.warmup:
            return (step + 1) / self.warmup
        return self._cos(self.warmup, 1.0, step)

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Set the LR of every group for optimizer step ``step`` (0-based); returns the factor."""
        f = self.factor(step)
        for g in optimizer.param_groups:
            g["lr"] = g["base_lr"] * f
        return f

    def rebase(self, step: int, new_total: int) -> None:
        """Continue from ``step`` with the LR it has now, decaying to ``min_ratio`` at
        ``new_total``."""
        if new_total <= step:
            raise ScheduleLengthError(
                f"new schedule length {new_total} is not past the resume step {step}"
            )
        f = self.factor(step)
        self.rebase_step, self.rebase_factor, self.total = int(step), float(f), int(new_total)

    def state_dict(self) -> dict:
        return dict(self.__dict__)

    def load_state_dict(self, state: dict) -> None:
        self.__dict__.update(state)
