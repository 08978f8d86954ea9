"""An endless, resumable stream of training batches over epochs.

The trainer counts optimizer steps, not epochs, so this wraps the data layer's loader (iterating
it yields one epoch) and moves on to the next epoch when one ends. The data position is the
loader's own ``state_dict()`` when it has one (:class:`umgclip.data.loader.ShardLoader`: it
fast-forwards *before* decoding); for a plain iterable it is ``(epoch, batches taken)`` and
resuming re-iterates and drops the batches already used.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Any

log = logging.getLogger(__name__)


class BatchStream:
    """``next(stream)`` yields batches forever; ``state_dict()`` is the data position."""

    def __init__(self, loader: Iterable[Any]) -> None:
        self.loader = loader
        self.native = hasattr(loader, "state_dict") and hasattr(loader, "load_state_dict")
        self.epoch = 0
        self.index = 0  # batches already yielded in ``epoch``
        self._it: Iterator[Any] | None = None

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> Any:
        if self._it is None:
            self._it = iter(self.loader)
        while True:
            try:
                batch = next(self._it)
            except StopIteration:
                if self.index == 0:
                    raise RuntimeError(
                        f"the training data yielded no batch in epoch {self.epoch}: check the "
                        "shards, the split and that batch_size <= samples per process"
                    ) from None
                self.epoch, self.index = self.epoch + 1, 0
                if not self.native and hasattr(self.loader, "set_epoch"):
                    self.loader.set_epoch(self.epoch)
                self._it = iter(self.loader)
                continue
            self.index += 1
            return batch

    def state_dict(self) -> dict[str, int]:
        if self.native:
            return dict(self.loader.state_dict())  # type: ignore[attr-defined]
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Position the stream so the next batch is the one after ``state``."""
        self._it = None
        if self.native:
            self.loader.load_state_dict(state)  # type: ignore[attr-defined]
            self.epoch, self.index = int(state["epoch"]), int(state.get("batches", 0))
            log.info("data position restored: %s", state)
            return
        self.epoch, self.index = int(state["epoch"]), 0
        if hasattr(self.loader, "set_epoch"):
            self.loader.set_epoch(self.epoch)
        self._it = iter(self.loader)
        for _ in range(int(state["index"])):
            try:
                next(self._it)
            except StopIteration:
                raise RuntimeError(
                    f"cannot resume the data position {state}: epoch {state['epoch']} has fewer "
                    "batches now (did the data or batch size change?)"
                ) from None
            self.index += 1
        log.info("data position restored: epoch %d, batch %d", self.epoch, self.index)
