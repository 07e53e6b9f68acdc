"""The `varco` command line."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from rich.console import Console

console = Console()


def _worker_module(name: str):
    """Import a workers/ module lazily: the producer side must run without torch installed."""
    try:
        return importlib.import_module(f"workers.{name}")
    except ImportError as exc:
        raise SystemExit(f"this command needs the worker extra: pip install 'varco-queue[worker]' ({exc})") from None


def cmd_make_tiny_model(args: argparse.Namespace) -> int:
    out = _worker_module("tiny_model").make_tiny_model(args.directory)
    console.print(f"tiny model saved to {out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    _worker_module("demo_engine").run_engine_demo(args.model, console)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="varco", description="VARCO-VISION inference queue")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-tiny-model", help="build the tiny offline test model into DIR")
    p.add_argument("directory")
    p.set_defaults(func=cmd_make_tiny_model)

    p = sub.add_parser("demo", help="run every task on drawn sample images")
    p.add_argument("--model", default=None, help="model dir or hub id (default: the tiny model, scripted)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
