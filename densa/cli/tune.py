"""`densa tune-windows`: grid-search plan windows and threshold on held-out text."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from densa.cli.common import positive_float, positive_int, unit_float
from densa.io import InputError

logger = logging.getLogger(__name__)


def window_range(text: str) -> tuple[int, int]:
    from densa.train.tune import parse_window

    try:
        return parse_window(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def register(subparsers) -> None:
    from densa.cli import HelpFormatter

    parser = subparsers.add_parser(
        "tune-windows",
        help="grid-search near/far windows and threshold for held-out perplexity vs block sparsity",
        description="Train a tiny density-adaptive model briefly (or load --checkpoint), then evaluate its "
        "held-out perplexity under every combination of near window, far window and density threshold. The "
        "plan only changes the attention mask, so one set of weights serves every configuration. Prints a "
        "table with perplexity, mean block sparsity and evaluation time, marks the Pareto front (lowest "
        "perplexity for its sparsity) and writes --json and --png.\n\n"
        "A window is MAX or MIN:MAX in tokens. MAX alone means MIN:MAX = MAX/2:MAX. Near windows apply "
        "within 2 blocks of dense text and far windows beyond, shrinking to MIN at 8 blocks. Combinations "
        "whose far window is wider than the near window are skipped. The model is trained under the "
        "median of each list, so configurations far from it also measure how the weights tolerate a "
        "changed mask.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--data", type=Path,
                        help="a .txt or .jsonl file or folder, such as ../shared/data/longdoc/govreport "
                        "(default: the built-in corpus, CPython's language reference)")
    parser.add_argument("--checkpoint", type=Path,
                        help="evaluate this checkpoint folder instead of training; its held-out split is the "
                        "one `densa train` uses for --data with the same --seed")
    parser.add_argument("--out", type=Path, default=Path("runs/tune"),
                        help="output folder (trained checkpoint, packing cache, default result files)")
    parser.add_argument("--json", type=Path, help="results file (default: OUT/tune_results.json)")
    parser.add_argument("--png", type=Path, help="Pareto plot (default: OUT/pareto.png)")

    grid = parser.add_argument_group("grid")
    grid.add_argument("--near-windows", type=window_range, nargs="+", default=["64", "128", "256"],
                      help="near windows to try, each MAX or MIN:MAX tokens")
    grid.add_argument("--far-windows", type=window_range, nargs="+", default=["16", "32", "64"],
                      help="far windows to try, each MAX or MIN:MAX tokens")
    grid.add_argument("--thresholds", type=unit_float, nargs="+", default=[0.6, 0.75, 0.9],
                      help="density thresholds to try, each in (0, 1]")
    grid.add_argument("--block-size", type=positive_int, default=64, help="kernel block size, in tokens")
    grid.add_argument("--max-dense-fraction", type=unit_float, default=0.02,
                      help="largest share of a sequence's blocks that may be high-density")

    run_group = parser.add_argument_group("training and evaluation")
    run_group.add_argument("--seq-len", type=positive_int, default=1024, help="tokens per sequence")
    run_group.add_argument("--steps", type=positive_int, default=100, help="training steps (without --checkpoint)")
    run_group.add_argument("--batch-size", type=positive_int, default=8, help="sequences per step and per evaluation batch")
    run_group.add_argument("--lr", type=positive_float, default=3e-3, help="peak learning rate")
    run_group.add_argument("--vocab-size", type=positive_int, default=4096, help="BPE vocabulary size (without --checkpoint)")
    run_group.add_argument("--eval-sequences", type=int, default=32,
                           help="held-out sequences evaluated per configuration (0: all)")
    run_group.add_argument("--seed", type=int, default=0, help="random seed (data split, initialisation, batches)")
    parser.set_defaults(func=run)


def _parse_defaults(args: argparse.Namespace) -> None:
    # argparse applies `type` only to defaults given as single strings, so the
    # list defaults above arrive unparsed.
    args.near_windows = [w if isinstance(w, tuple) else window_range(w) for w in args.near_windows]
    args.far_windows = [w if isinstance(w, tuple) else window_range(w) for w in args.far_windows]


def build_grid(args: argparse.Namespace):
    from densa.train.tune import TuneGrid

    _parse_defaults(args)
    if args.eval_sequences < 0:
        raise InputError(f"--eval-sequences {args.eval_sequences} is invalid; use 0 (all) or a positive count")
    try:
        return TuneGrid(near_windows=tuple(args.near_windows), far_windows=tuple(args.far_windows),
                        thresholds=tuple(args.thresholds), seq_len=args.seq_len, block_size=args.block_size,
                        max_dense_fraction=args.max_dense_fraction)
    except ValueError as err:
        raise InputError(str(err)) from None


def load_for_tuning(args: argparse.Namespace, documents: list):
    """Return (model, held-out packed data, settings) from --checkpoint."""
    from densa.data.corpus import train_val_split
    from densa.data.packing import pack_documents
    from densa.data.tokenizer import DensaTokenizer
    from densa.train.checkpoint import TOKENIZER_FILE, load_model

    model = load_model(args.checkpoint)
    tokenizer_file = args.checkpoint / TOKENIZER_FILE
    if not tokenizer_file.is_file():
        raise InputError(f"checkpoint {args.checkpoint} has no {TOKENIZER_FILE}; pass a folder written by "
                         "`densa train` or `densa demo`, which save the tokenizer with the weights")
    if args.seq_len > model.config.max_seq_len:
        raise InputError(f"--seq-len {args.seq_len} exceeds the checkpoint's max_seq_len "
                         f"{model.config.max_seq_len}; use a shorter --seq-len")
    tokenizer = DensaTokenizer.load(tokenizer_file)
    try:
        _, val_docs = train_val_split(documents, 0.1, args.seed)
        val = pack_documents(val_docs, tokenizer, args.seq_len, cache_dir=args.out / "cache")
    except ValueError as err:
        raise InputError(str(err)) from None
    return model, val, {"checkpoint": str(args.checkpoint)}


def train_for_tuning(args: argparse.Namespace, documents: list, grid):
    """Train a tiny density model under the grid's middle plan; return (model, held-out data, settings)."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    from densa.model.config import tiny
    from densa.train.checkpoint import load_model
    from densa.train.recipe import prepare_data, train_model
    from densa.train.trainer import TrainConfig

    try:
        data = prepare_data(documents, args.seq_len, args.vocab_size, seed=args.seed, cache_dir=args.out / "cache")
        plan = grid.middle()
        model_config = tiny(data.tokenizer.vocab_size, attention="density", plan=plan,
                            max_seq_len=max(args.seq_len, 2 * grid.block_size))
        train_config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                   warmup_steps=max(args.steps // 10, 1), seed=args.seed, eval_batches=1)
    except ValueError as err:
        raise InputError(str(err)) from None
    logger.info("training a tiny density model for %d steps under near %s, far %s, threshold %.2f",
                args.steps, plan.near_window, plan.far_window, plan.threshold)
    with logging_redirect_tqdm():
        result = train_model(model_config, train_config, data, args.out)
    model = load_model(args.out / "checkpoint")
    settings = {"trained": {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
                            "train_sequences": len(data.train.tokens), "final_loss": result.losses[-1],
                            "plan": {"near_window": list(plan.near_window), "far_window": list(plan.far_window),
                                     "threshold": plan.threshold}},
                "checkpoint": str(args.out / "checkpoint")}
    return model, data.val, settings


def run(args: argparse.Namespace) -> int:
    from densa.data.corpus import builtin_corpus
    from densa.data.readers import read_documents
    from densa.io import atomic_write_text
    from densa.train.tune import NEAR_BLOCKS, FAR_BLOCKS, format_table, save_pareto_plot, tune_windows

    grid = build_grid(args)
    json_path = args.json or args.out / "tune_results.json"
    png_path = args.png or args.out / "pareto.png"
    documents = builtin_corpus() if args.data is None else read_documents(args.data)
    if args.checkpoint is not None:
        model, val, settings = load_for_tuning(args, documents)
    else:
        model, val, settings = train_for_tuning(args, documents, grid)

    reference, rows = tune_windows(model, val, grid, args.batch_size, args.eval_sequences)
    n_eval = len(val.tokens) if not args.eval_sequences else min(args.eval_sequences, len(val.tokens))
    settings.update({
        "data": str(args.data) if args.data is not None else "builtin",
        "seq_len": args.seq_len, "block_size": grid.block_size,
        "near_tokens": NEAR_BLOCKS * grid.block_size, "far_tokens": FAR_BLOCKS * grid.block_size,
        "max_dense_fraction": grid.max_dense_fraction, "eval_sequences": n_eval, "seed": args.seed,
    })
    results = {"settings": settings, "dense": reference, "results": rows}
    atomic_write_text(json_path, json.dumps(results, indent=2) + "\n")
    save_pareto_plot(reference, rows, png_path,
                     title=f"{Path(settings['data']).name}: {n_eval} held-out sequences of {args.seq_len} tokens")

    print(format_table(reference, rows))
    print(f"\nresults: {json_path}\nplot: {png_path}")
    return 0
