"""The ``stagewise example-hello`` subcommand: proof that a plugin can extend the CLI."""

from __future__ import annotations

import argparse
from importlib.metadata import version


def add_hello(cli: argparse._SubParsersAction) -> None:
    parser = cli.add_parser("example-hello", help="say hello from the example plugin")
    parser.add_argument("--name", default="world", help="who to greet (default: world)")
    parser.set_defaults(handler=hello)


def hello(args: argparse.Namespace) -> int:
    print(f"hello, {args.name}, from stagewise-example-plugin {version('stagewise-example-plugin')}")
    return 0
