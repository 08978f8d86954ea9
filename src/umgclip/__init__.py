"""umgclip: UMG-CLIP, a unified multi-granularity vision-language model.

Public API (open_clip shape)::

    import umgclip
    model, preprocess = umgclip.create_model_and_transforms("umg-lite")
    tokenizer = umgclip.get_tokenizer("umg-lite")
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "create_model": "umgclip.model.registry",
    "create_model_and_transforms": "umgclip.model.registry",
    "load_model": "umgclip.model.registry",
    "get_tokenizer": "umgclip.model.registry",
    "list_models": "umgclip.model.registry",
}

__all__ = ["__version__", *_LAZY]


def __dir__() -> list[str]:
    # Lazy attributes still show up in dir() and tab completion.
    return sorted({*globals(), *_LAZY})


def __getattr__(name: str) -> Any:
    # Lazy so that `import umgclip` (and the data CLI) stays fast and torch-model free.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'umgclip' has no attribute {name!r}")
