"""`densa demo`: the main job, three attention patterns trained side by side on real text."""

from __future__ import annotations

import argparse
from pathlib import Path

from densa.cli.common import positive_int


def register(subparsers) -> None:
    from densa.cli import HelpFormatter

    parser = subparsers.add_parser(
        "demo",
        help="train dense, sliding-window and density-adaptive models and compare them",
        description="Train three tiny models (dense, sliding-window and density-adaptive attention) with the "
        "same budget on the built-in corpus (CPython's language reference, no download), then print held-out "
        "perplexity, training tokens/s, block sparsity and peak memory. Writes demo_results.json, "
        "density_heatmap.png and one checkpoint per model into --out. About 3 minutes on 2 idle CPU cores.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder")
    parser.add_argument("--steps", type=positive_int, default=80, help="training steps per model")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="sequences per step")
    parser.add_argument("--seq-len", type=positive_int, default=512, help="tokens per sequence")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from densa.io import InputError
    from densa.train.demo import DemoConfig, run_demo

    try:
        config = DemoConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, seed=args.seed)
    except ValueError as err:
        raise InputError(str(err)) from None
    run_demo(config, args.out)
    return 0
