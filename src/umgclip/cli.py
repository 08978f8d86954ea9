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
    except _user_errors() as e:
        # A user's mistake (a config typo, a missing file, a bad image or box) gets one clear
        # line, not a 30-line traceback; --verbose keeps the traceback for bug reports.
        if args.verbose:
            raise
        print(f"umgclip {args.command}: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    return int(rc or 0)


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean bad input rather than a bug in umgclip."""
    import json

    from umgclip.config import ConfigError
    from umgclip.data.images import ImageDecodeError
    from umgclip.data.schema import SchemaError

    errors: list[type[BaseException]] = [
        ConfigError,
        SchemaError,
        ImageDecodeError,
        FileNotFoundError,
        NotADirectoryError,
        json.JSONDecodeError,
    ]
    try:  # model-side errors, when the model package imports (it needs torch)
        from umgclip.model.io import CheckpointError
        from umgclip.model.regions import BoxError
        from umgclip.train.checkpoint import CheckpointError as TrainCheckpointError

        errors += [CheckpointError, BoxError, TrainCheckpointError]
    except ImportError:
        pass
    return tuple(errors)


if __name__ == "__main__":
    sys.exit(main())
