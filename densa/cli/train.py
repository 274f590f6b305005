"""`densa train`: train a model on your own text, on one process or many."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from densa.cli.common import add_model_args, positive_float, positive_int
from densa.io import InputError

logger = logging.getLogger(__name__)


def register(subparsers) -> None:
    from densa.cli import HelpFormatter

    parser = subparsers.add_parser(
        "train",
        help="train a model on text files",
        description="Train a density-adaptive (or dense / sliding-window) model on .txt or .jsonl files, "
        "a folder of them, including the VCSum, GovReport and annual-report JSON-lines layouts. Omit --data to use the built-in "
        "corpus (CPython's language reference).",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--data", type=Path, help="a .txt or .jsonl file, or a folder of them")
    parser.add_argument("--out", type=Path, default=Path("runs/train"), help="output folder")
    parser.add_argument("--resume", type=Path,
                        help="folder to resume from: OUT/checkpoint of a single-process run, or OUT/snapshots "
                        "of a multi-process one (which can resume at another layout)")
    add_model_args(parser)
    group = parser.add_argument_group("training")
    group.add_argument("--steps", type=positive_int, default=200,
                       help="total optimisation steps; a resumed run continues up to this count")
    group.add_argument("--batch-size", type=positive_int, default=8, help="sequences per step")
    group.add_argument("--seq-len", type=positive_int, default=512, help="tokens per sequence")
    group.add_argument("--lr", type=positive_float, default=2e-3, help="peak learning rate")
    group.add_argument("--warmup-steps", type=int, default=20, help="linear warmup steps")
    group.add_argument("--grad-clip", type=float, default=1.0,
                       help="maximum global gradient norm before each optimizer step (0: no clipping)")
    group.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="compute dtype (autocast)")
    group.add_argument("--seed", type=int, default=0, help="random seed")
    group.add_argument("--vocab-size", type=positive_int, default=4096, help="BPE vocabulary size")
    group.add_argument("--domain-dict", type=Path, action="append", default=[],
                       help="domain term list (one term per line, or jieba user-dict format); repeatable")
    group.add_argument("--eval-every", type=int, default=None,
                       help="steps between held-out evaluations (0: end only; unset: 50); single process only, "
                       "multi-process runs log the training loss")
    group.add_argument("--ckpt-every", type=int, default=100, help="steps between checkpoints (0: end only)")
    try:
        from densa.train.parallel.launch import add_parallel_args
    except ModuleNotFoundError:
        pass
    else:
        add_parallel_args(parser)
    parser.set_defaults(func=run)


def build_configs(args):
    """ModelConfig and TrainConfig from parsed flags; invalid combinations raise InputError."""
    from densa.density.plan import PlanConfig
    from densa.model.config import preset
    from densa.train.trainer import TrainConfig

    try:
        plan = PlanConfig(threshold=args.threshold, block_size=args.block_size)
        model_config = preset(args.config, attention=args.attention, window=args.window, plan=plan,
                              vocab_size=args.vocab_size)
        train_config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                   warmup_steps=args.warmup_steps, grad_clip=args.grad_clip, dtype=args.dtype,
                                   seed=args.seed, eval_every=50 if args.eval_every is None else args.eval_every,
                                   ckpt_every=args.ckpt_every)
    except ValueError as err:
        raise InputError(str(err)) from None
    if args.seq_len > model_config.max_seq_len:
        raise InputError(f"--seq-len {args.seq_len} exceeds the {args.config} preset's max_seq_len "
                         f"{model_config.max_seq_len}; use a shorter --seq-len or a larger --config")
    return model_config, train_config


def check_resume(path: Path | None) -> None:
    """Reject a --resume folder that a single-process run cannot resume from, before the data is prepared."""
    from densa.train.checkpoint import TRAINER_FILE

    if path is None or (path / TRAINER_FILE).is_file():
        return
    if not path.exists():
        raise InputError(f"--resume {path}: path not found; pass the OUT/checkpoint folder of an earlier run")
    if (path / "latest").is_file():  # the pointer file of densa.train.parallel.snapshot
        raise InputError(f"--resume {path} contains multi-process snapshots; resume them with --nproc N (2 or more)")
    raise InputError(f"--resume {path} has no trainer state ({TRAINER_FILE}); pass OUT/checkpoint of a "
                     "single-process run, or OUT/snapshots of a multi-process run with --nproc N")


def run(args: argparse.Namespace) -> int:
    # A multi-machine job may run one process per machine, so nnodes alone also launches torchrun.
    if getattr(args, "nproc", 1) > 1 or str(getattr(args, "nnodes", "1")) != "1":
        from densa.train.parallel.launch import launch

        return launch(args)

    from tqdm.contrib.logging import logging_redirect_tqdm

    from densa.data.corpus import builtin_corpus
    from densa.data.readers import read_documents
    from densa.density import DensityConfig
    from densa.train.recipe import prepare_data, train_model

    model_config, train_config = build_configs(args)
    check_resume(args.resume)
    analyzer_config = DensityConfig(domain_dicts=tuple(str(p) for p in args.domain_dict))
    documents = builtin_corpus() if args.data is None else read_documents(args.data)
    try:
        data = prepare_data(documents, args.seq_len, args.vocab_size, seed=args.seed,
                            analyzer_config=analyzer_config, cache_dir=args.out / "cache")
    except ValueError as err:
        raise InputError(str(err)) from None
    with logging_redirect_tqdm():
        result = train_model(model_config, train_config, data, args.out, resume=args.resume)
    summary = {"steps": result.step, "final_loss": result.losses[-1], "val_ppl": result.val_ppl,
               "tokens_per_s": result.tokens_per_s, "peak_mem_mb": result.peak_mem_mb,
               "checkpoint": str(args.out / "checkpoint")}
    print(json.dumps(summary, indent=2))
    return 0
