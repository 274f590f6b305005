"""Argument helpers shared by subcommands: typed checks that exit with code 2."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is invalid; use a positive integer")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{value} is invalid; use a positive number")
    return value


def unit_float(text: str) -> float:
    """A number in (0, 1]."""
    value = positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"{value} is invalid; use a value in (0, 1]")
    return value


def add_model_args(parser: argparse.ArgumentParser, attention_default: str = "density") -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--config", default="tiny", choices=["tiny", "small", "base"], help="model preset")
    group.add_argument("--attention", default=attention_default, choices=["dense", "sliding", "density"],
                       help="attention pattern")
    group.add_argument("--window", type=positive_int, default=128,
                       help="window of --attention sliding, in tokens")
    group.add_argument("--threshold", type=unit_float, default=0.7,
                       help="token density at or above which a token counts as dense")
    group.add_argument("--block-size", type=positive_int, default=128, help="kernel block size, in tokens")
