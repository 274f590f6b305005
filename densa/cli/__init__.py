"""The `densa` command.

Each subcommand lives in its own module under densa/cli/ and exposes
`register(subparsers)`, which adds its parser and sets `func` to the function
that runs it. Usage errors and invalid input exit with code 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from densa.io import InputError

# Modules that define subcommands, in the order `densa --help` lists them.
SUBCOMMAND_MODULES = [
    "densa.cli.demo",
    "densa.cli.train",
    "densa.cli.generate",
    "densa.cli.analyze",
    "densa.cli.tune",
    "densa.cli.plan",
    "densa.cli.align",
]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show defaults in --help and keep description paragraphs as written."""

    def _get_help_string(self, action):
        # An option without a default gets no "(default: None)" suffix.
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="densa",
        description="Density-adaptive attention for long-context language models.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            # A subcommand whose module is not in this checkout is simply absent.
            if err.name == name:
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # matplotlib reports every font it cannot parse at INFO.
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    try:
        return args.func(args) or 0
    except InputError as err:
        print(f"densa {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
