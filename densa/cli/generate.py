"""`densa generate`: continue a prompt with a trained checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

from densa.cli.common import positive_int


def register(subparsers) -> None:
    from densa.cli import HelpFormatter

    parser = subparsers.add_parser(
        "generate",
        help="generate text from a checkpoint",
        description="Continue a prompt with a checkpoint written by `densa train` or `densa demo`. "
        "Prompt densities come from the density analyser, as in training.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--checkpoint", type=Path, required=True, help="checkpoint folder")
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument("--max-new-tokens", type=positive_int, default=64, help="tokens to generate")
    parser.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (0: greedy)")
    parser.add_argument("--top-k", type=positive_int, default=50, help="sample among the k likeliest tokens")
    parser.add_argument("--seed", type=int, default=0, help="random seed for sampling")
    parser.add_argument("--cache", default="auto", choices=["auto", "full", "density"],
                        help="key/value cache: keep every key, or only those the decode-time mask can read; "
                        "auto picks density for sparse models and full for dense ones")
    parser.add_argument("--prefill-chunk", type=positive_int,
                        help="feed the prompt in chunks of this many tokens (with --cache density)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from densa.data.tokenizer import DensaTokenizer
    from densa.density import DensityAnalyzer
    from densa.io import InputError
    from densa.model.generate import generate
    from densa.train.checkpoint import TOKENIZER_FILE, load_model

    if args.temperature < 0:
        raise InputError(f"--temperature {args.temperature} is invalid; use 0 (greedy) or a positive value")
    if not args.prompt.strip():
        raise InputError("--prompt is empty; pass some text to continue")
    model = load_model(args.checkpoint)
    tokenizer = DensaTokenizer.load(args.checkpoint / TOKENIZER_FILE)
    ids, offsets = tokenizer.encode(args.prompt)
    if len(ids) + args.max_new_tokens > model.config.max_seq_len:
        raise InputError(f"prompt ({len(ids)} tokens) plus --max-new-tokens {args.max_new_tokens} exceeds the "
                         f"model's max_seq_len {model.config.max_seq_len}; shorten one of them")
    density = DensityAnalyzer().analyze(args.prompt, offsets).density[None]
    cache = args.cache
    if cache == "auto":
        cache = "full" if model.config.attention == "dense" else "density"
    generator = torch.Generator().manual_seed(args.seed)
    tokens = generate(model, torch.tensor([ids]), args.max_new_tokens, density=density,
                      temperature=args.temperature, top_k=args.top_k, eos_id=tokenizer.eos_id,
                      generator=generator, cache=cache, prefill_chunk=args.prefill_chunk)
    print(tokenizer.decode(tokens[0].tolist()))
    return 0
