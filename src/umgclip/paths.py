"""Where umgclip finds the shipped data (never copied into the repo)."""

from __future__ import annotations

import os
from pathlib import Path

#: Searched in order: $UMGCLIP_DATA, then ../shared/data next to the checkout and the cwd.
ENV_VAR = "UMGCLIP_DATA"


def data_roots() -> list[Path]:
    """Candidate data roots, most specific first."""
    roots: list[Path] = []
    if os.environ.get(ENV_VAR):
        roots.append(Path(os.environ[ENV_VAR]))
    here = Path(__file__).resolve()
    for base in (Path.cwd(), *here.parents):
        roots.append(base / ".." / "shared" / "data")
        roots.append(base / "shared" / "data")
    seen: list[Path] = []
    for r in roots:
        r = r.resolve()
        if r not in seen:
            seen.append(r)
    return seen


def find_coco_mg() -> Path | None:
    """The coco_mg folder (or a COCO-layout folder named by $UMGCLIP_DATA), or None.

    When $UMGCLIP_DATA is set, only it is searched: a user who names a data folder must not get
    another one silently.
    """
    roots = [Path(os.environ[ENV_VAR]).resolve()] if os.environ.get(ENV_VAR) else data_roots()
    for root in roots:
        for cand in (root / "coco_mg", root):
            if (cand / "annotations" / "captions.json").is_file() and (cand / "images").is_dir():
                return cand
    return None
