"""Parameter-efficient adaptation: Convpass adapters, task decoders, ``umgclip adapt``.

Public API::

    from umgclip.adapt import add_adapters, adapt, load_adapted, evaluate_adapted, predict_panoptic
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "add_adapters": "umgclip.adapt.adapters",
    "adapters_disabled": "umgclip.adapt.adapters",
    "AdaptConfig": "umgclip.adapt.config",
    "adapt": "umgclip.adapt.train",
    "AdaptedModel": "umgclip.adapt.model",
    "load_adapted": "umgclip.adapt.model",
    "evaluate_adapted": "umgclip.adapt.evaluate",
    "predict_panoptic": "umgclip.adapt.panoptic_inference",
    "draw_panoptic": "umgclip.adapt.panoptic_inference",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    # Lazy: `umgclip --help` and the data CLI must not import torch models.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'umgclip.adapt' has no attribute {name!r}")
