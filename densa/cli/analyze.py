"""`densa analyze FILE`: density map, block plan and attention cost of one document."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from densa.cli.common import positive_int, unit_float


def register(subparsers) -> None:
    from densa.cli import HelpFormatter

    parser = subparsers.add_parser(
        "analyze",
        help="show a document's token densities, block plan and attention cost",
        description="Score every token of FILE (UTF-8 text: Chinese, English or mixed), build the block plan "
        "and compare its attention FLOPs and memory with dense causal attention at the same length. "
        "Without --tokenizer, a byte-level BPE is trained on FILE itself (a few seconds).",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("file", type=Path, help="text file to analyse")
    parser.add_argument("--tokenizer", type=Path,
                        help="tokenizer.json, or a checkpoint folder that contains one")
    parser.add_argument("--threshold", type=unit_float, default=0.7, help="density threshold of dense tokens")
    parser.add_argument("--block-size", type=positive_int, default=128, help="kernel block size, in tokens")
    parser.add_argument("--domain-dict", type=Path, action="append", default=[],
                        help="domain term list raising those terms' density; repeatable")
    parser.add_argument("--heads", type=positive_int, default=8, help="query heads, for the cost estimate")
    parser.add_argument("--head-dim", type=positive_int, default=64, help="head dimension, for the cost estimate")
    parser.add_argument("--max-tokens", type=positive_int, default=65536, help="analyse at most this many tokens")
    parser.add_argument("--png", type=Path, help="write a density heat map here")
    parser.add_argument("--json", type=Path, help="write the analysis as JSON here")
    parser.set_defaults(func=run)


def load_tokenizer(path: Path | None, text: str):
    from densa.data.tokenizer import DensaTokenizer
    from densa.train.checkpoint import TOKENIZER_FILE

    if path is None:
        return DensaTokenizer.train([text], vocab_size=4096)
    if path.is_dir():
        path = path / TOKENIZER_FILE
    return DensaTokenizer.load(path)


def plan_runs(plan) -> list[dict]:
    """Group consecutive blocks of the same kind: [{kind, first_block, last_block, windows}]."""
    runs = []
    for block in range(plan.n_blocks):
        kind = "dense" if bool(plan.dense[block]) else "window"
        if runs and runs[-1]["kind"] == kind:
            runs[-1]["last_block"] = block
        else:
            runs.append({"kind": kind, "first_block": block, "last_block": block, "windows": []})
        if kind == "window":
            runs[-1]["windows"].append(int(plan.window[block]))
    return runs


def attention_cost(plan, heads: int, head_dim: int) -> dict:
    """FLOPs and bytes of one causal attention layer: the plan's blocks against dense causal attention.

    FLOPs count QK^T and PV (2 multiply-adds per key, per query, per head dim)
    over whole computed blocks. Score bytes assume fp32 scores materialised
    per head, as eager attention does; fused kernels keep only a tile.
    """
    pair_flops = 4 * heads * head_dim
    block_pairs = plan.block_size**2
    dense_blocks, computed = plan.total_blocks(), plan.computed_blocks()
    return {
        "tokens": plan.seq_len,
        "dense_causal_gflops": dense_blocks * block_pairs * pair_flops / 1e9,
        "plan_gflops": computed * block_pairs * pair_flops / 1e9,
        "dense_scores_mb": heads * dense_blocks * block_pairs * 4 / 2**20,
        "plan_scores_mb": heads * computed * block_pairs * 4 / 2**20,
        "block_sparsity": plan.block_sparsity(),
        "ideal_speedup": plan.ideal_speedup(),
    }


def run(args: argparse.Namespace) -> int:
    from densa.density import DensityAnalyzer, DensityConfig, PlanConfig, plan_blocks
    from densa.io import InputError, atomic_write_text, read_text_file

    text = read_text_file(args.file)
    try:
        analyzer = DensityAnalyzer(DensityConfig(domain_dicts=tuple(str(p) for p in args.domain_dict)))
        plan_config = PlanConfig(threshold=args.threshold, block_size=args.block_size)
    except ValueError as err:
        raise InputError(str(err)) from None
    tokenizer = load_tokenizer(args.tokenizer, text)
    ids, offsets = tokenizer.encode(text)
    if len(ids) > args.max_tokens:
        ids, offsets = ids[: args.max_tokens], offsets[: args.max_tokens]
        text = text[: offsets[-1][1]]
    result = analyzer.analyze(text, offsets)
    density = result.density
    plan = plan_blocks(density, plan_config)
    cost = attention_cost(plan, args.heads, args.head_dim)

    above = float((density >= args.threshold).float().mean())
    print(f"{args.file}: {len(ids)} tokens, mean density {float(density.mean()):.3f}, "
          f"{above:.1%} of tokens at or above {args.threshold}")
    top = sorted({w[2]: w[4] for w in result.words}.items(), key=lambda item: -item[1])[:15]
    print("densest words: " + ", ".join(f"{word} ({score:.2f})" for word, score in top))

    print(f"\nblock plan ({plan.n_blocks} blocks of {plan.block_size} tokens):")
    runs = plan_runs(plan)
    for run_ in runs:
        span = f"blocks {run_['first_block']}-{run_['last_block']}"
        tokens = (f"tokens {run_['first_block'] * plan.block_size}-"
                  f"{min((run_['last_block'] + 1) * plan.block_size, plan.seq_len) - 1}")
        if run_["kind"] == "dense":
            print(f"  {span:<16} {tokens:<20} dense: full attention")
        else:
            print(f"  {span:<16} {tokens:<20} window {min(run_['windows'])}-{max(run_['windows'])} tokens")

    print(f"\nattention per layer at {plan.seq_len} tokens ({args.heads} heads, head dim {args.head_dim}, causal):")
    print(f"  FLOPs:  {cost['plan_gflops']:.2f} GFLOP against {cost['dense_causal_gflops']:.2f} dense "
          f"({cost['ideal_speedup']:.1f}x fewer, block sparsity {cost['block_sparsity']:.1%})")
    print(f"  scores: {cost['plan_scores_mb']:.1f} MiB against {cost['dense_scores_mb']:.1f} MiB dense, "
          "if materialised in fp32")

    if args.png:
        from densa.density.viz import save_density_heatmap

        save_density_heatmap(density, plan, args.png, title=f"token density: {args.file.name}")
        print(f"\nheat map: {args.png}")
    if args.json:
        record = {"file": str(args.file), "density": [round(float(d), 4) for d in density],
                  "dense_blocks": plan.dense.tolist(), "windows": plan.window.tolist(), "runs": runs, **cost}
        atomic_write_text(args.json, json.dumps(record, ensure_ascii=False) + "\n")
        print(f"analysis: {args.json}")
    return 0
