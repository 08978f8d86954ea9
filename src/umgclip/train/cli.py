"""``umgclip train CONFIG.yaml [--set k=v ...] [--resume [PATH]]`` (also ``python -m
umgclip.train`` and ``torchrun ... -m umgclip.train``)."""

from __future__ import annotations

import argparse
import logging
import os


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config (PretrainConfig; see README 'Training')")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set optim.lr=1e-4 (repeatable)",
    )
    p.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        metavar="PATH",
        help="continue from the run folder's latest checkpoint, or from PATH",
    )


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from umgclip.config import load_config
    from umgclip.train.config import PretrainConfig
    from umgclip.train.distributed import cleanup
    from umgclip.train.pretrain import train

    cfg = load_config(PretrainConfig, args.config, args.overrides)
    try:
        run_dir = train(cfg, resume=args.resume)
    finally:
        cleanup()
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"run folder: {run_dir}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="pre-train a UMG-CLIP model (torchrun-ready)")
    add_arguments(p)
    p.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m umgclip.train")
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    return run(args)
