"""The ``umgclip`` command. Each area registers its own sub-commands (one module per area), so
this file only dispatches: ``umgclip data|annotate|annotate-eval|train|eval|predict|adapt|demo``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# (module, attribute) pairs; each module's ``register(subparsers)`` adds its commands and sets
# ``func`` on the parser it adds. Imported lazily so `umgclip data ...` does not pay for torch
# model imports it does not use.
_AREAS: list[str] = [
    "umgclip.data.cli",
    "umgclip.annotate.cli",
    "umgclip.train.cli",
    "umgclip.eval.cli",
    "umgclip.adapt.cli",
    "umgclip.demo",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="umgclip",
        description="UMG-CLIP: multi-granularity vision-language models "
        "(annotate, pre-train, adapt, evaluate).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _AREAS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # area not built yet
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
