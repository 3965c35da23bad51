"""The ``autotp`` command line: one subcommand per module in ``autotp.cli.commands``.

Each module there defines ``register(subparsers)``, which adds its parser and sets
``func(args) -> int`` as the parser default. Errors from the library (``AutoTPError``) print one
line and exit 2; they never show a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

import autotp.cli.commands
from autotp.errors import AutoTPError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="autotp", description="Automatic tensor parallelism for PyTorch models.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(autotp.cli.commands.__path__), key=lambda m: m.name):
        importlib.import_module(f"autotp.cli.commands.{info.name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except AutoTPError as exc:
        print(f"autotp: error: {exc}", file=sys.stderr)
        return 2

