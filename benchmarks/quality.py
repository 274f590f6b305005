"""Quality evidence for density-adaptive attention on real long documents.

Two parts, selected with --parts:

perplexity: three small models (--model: `mini`, 1.8M parameters, or the
    `tiny` preset) with
    dense, sliding-window and density-adaptive attention are trained one after
    another on CPU with the same tokenizer, data, seed, steps and batches.
    Each is evaluated on held-out documents of each source: VCSum meetings
    (Chinese), GovReport reports (English) and 20-page chunks of a bank's
    annual report (Chinese). The sliding window is the widest whose block
    sparsity is closest to the mean sparsity of the density plans of the
    training sequences, so both sparse models skip the same share of blocks.

reachability: a pass key ("The pass key is 58213. Remember it. 58213 is the
    pass key.", in Chinese for Chinese documents) is inserted at several
    depths of real documents cut to 8K and 16K tokens, and a question asking
    for it ends the text. For each layer count L, the check asks whether every
    token of one occurrence of the number can reach the final token through L
    layers of the mask. It compares the density plan (library default
    PlanConfig) with the widest sliding window of equal block sparsity. The
    check is exact at the mask level but says nothing about whether a trained
    model uses the path, and no trained model runs in this part.

Records (--json) are a list of dicts with "part" set to "perplexity" or
"reachability". Perplexity records: attention, window (sliding only),
train_block_sparsity, val_block_sparsity (per source), val_ppl (per source
and "all", the token-weighted mean), train_seconds, final_loss (mean of the
last 10 steps), steps, batch_size, seq_len. Reachability records: source,
document, length (nominal), tokens (actual, at most length), depth (fraction
of the text before the pass key, moved forward to the next sentence end),
key_token (index of the number's first token), layers, density_reachable,
sliding_reachable, density_sparsity, sliding_window, sliding_sparsity and
key_block_dense (whether the pass key's block is high-density).

Example (on 2 shared CPU cores the perplexity part took about 65 minutes
with the default 1000 steps of the mini model on one thread, the
reachability part about 10 minutes):

    python benchmarks/quality.py --json quality.json

Legend: S sequences, T tokens, N kernel blocks.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from densa.data.corpus import train_val_split
from densa.data.packing import PackedDataset, pack_documents
from densa.data.readers import Document, read_annual_report, read_govreport, read_vcsum
from densa.data.tokenizer import DensaTokenizer
from densa.density import DensityAnalyzer
from densa.density.plan import BlockPlan, PlanConfig, plan_blocks
from densa.io import atomic_write_text
from densa.model.config import tiny
from densa.model.llama import Transformer
from densa.train.trainer import TrainConfig, Trainer
from densa.train.tune import evaluate_plan

LONGDOC = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "longdoc"
VCSUM = LONGDOC / "vcsum" / "short_dev.txt"
GOVREPORT = LONGDOC / "govreport" / "gov_report_summ.jsonl"
ANNUAL_REPORT = LONGDOC / "annual_reports" / "601658_2019_annual_report.jsonl"
SOURCES = ("vcsum", "govreport", "annual_report")
PAGES_PER_CHUNK = 20

# Windows scaled from the library defaults (near 128-256, far 32-64 tokens at
# 128-token blocks) to 64-token blocks. Up to 10% of blocks may be dense, so a
# 1,024-token sequence gets up to 2 dense blocks of its 16.
PPL_PLAN = PlanConfig(threshold=0.7, block_size=64, near_window=(64, 128), far_window=(16, 32),
                      near_tokens=128, far_tokens=512, max_dense_fraction=0.1)
# The library defaults, meant for 8K-64K tokens.
REACH_PLAN = PlanConfig()
# Changes to the tiny preset. "mini" keeps about 0.8M parameters outside the
# embeddings, so that 1000 steps of each model fit in a CPU benchmark.
MODEL_SIZES = {"tiny": {}, "mini": dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=384)}

PASSKEY = {
    "en": " The pass key is {key}. Remember it. {key} is the pass key. ",
    "zh": "通行密码是{key}。记住它。{key}就是通行密码。",
}
QUESTION = {"en": "\nWhat is the pass key? The pass key is", "zh": "\n通行密码是什么？通行密码是"}

log = logging.getLogger("benchmarks.quality")


# ---------------------------------------------------------------------------
# Data


def load_sources() -> dict[str, list[Document]]:
    """Read the documents of each source: VCSum meetings, GovReport reports and 20-page annual-report chunks."""
    report = read_annual_report(ANNUAL_REPORT)[0]
    starts = sorted(report.meta["page_starts"].values())
    chunks = []
    for i in range(0, len(starts), PAGES_PER_CHUNK):
        end = starts[i + PAGES_PER_CHUNK] if i + PAGES_PER_CHUNK < len(starts) else len(report.text)
        chunks.append(Document(report.text[starts[i]:end], report.source, {"first_page_index": i}))
    return {"vcsum": read_vcsum(VCSUM), "govreport": read_govreport(GOVREPORT), "annual_report": chunks}


def sliding_sparsity(seq_len: int, window: int, block_size: int) -> float:
    return BlockPlan.sliding(seq_len, window, block_size).block_sparsity()


def mean_sparsity(density: torch.Tensor, config: PlanConfig) -> float:
    """Mean block sparsity of the density plans of rows [S, T]."""
    return statistics.fmean(plan_blocks(row, config).block_sparsity() for row in density)


# ---------------------------------------------------------------------------
# Part 1: held-out perplexity at equal block sparsity


def run_perplexity(args: argparse.Namespace) -> list[dict]:
    sources = load_sources()
    train_docs, val_docs = [], {}
    for name in SOURCES:
        train, val = train_val_split(sources[name], 0.2, args.seed)
        train_docs += train
        val_docs[name] = val
    log.info("documents: %d train, held out %s", len(train_docs), {k: len(v) for k, v in val_docs.items()})

    tokenizer = DensaTokenizer.train([d.text for d in train_docs], args.vocab_size)
    cache = args.cache
    train = pack_documents(train_docs, tokenizer, args.seq_len, cache_dir=cache)
    val = {}
    for name, docs in val_docs.items():
        packed = pack_documents(docs, tokenizer, args.seq_len, cache_dir=cache)
        # The first sequences of each held-out source, to bound evaluation time.
        val[name] = PackedDataset(packed.tokens[: args.eval_sequences], packed.density[: args.eval_sequences])

    train_sparsity = mean_sparsity(train.density[:, :-1], PPL_PLAN)
    window = matched_window(args.seq_len, train_sparsity, PPL_PLAN.block_size)
    window_sparsity = sliding_sparsity(args.seq_len, window, PPL_PLAN.block_size)
    print(f"train: {len(train.tokens)} sequences of {args.seq_len} tokens; held out: "
          + ", ".join(f"{name} {len(v.tokens)}" for name, v in val.items()))
    print(f"density plans skip {train_sparsity:.1%} of blocks on the training sequences; "
          f"sliding window {window} tokens skips {window_sparsity:.1%}", flush=True)

    train_config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                               warmup_steps=max(args.steps // 10, 1), seed=args.seed, progress=False)
    records = []
    # The two sparse models first: their comparison is the point, and the
    # records are written after each model, so a cut-short run still has it.
    for attention in ("density", "sliding", "dense"):
        torch.manual_seed(args.seed)
        config = tiny(tokenizer.vocab_size, attention=attention, window=window, plan=PPL_PLAN,
                      max_seq_len=args.seq_len, **MODEL_SIZES[args.model])
        model = Transformer(config)
        trainer = Trainer(model, train, train_config)
        start = time.perf_counter()
        result = trainer.fit()
        seconds = time.perf_counter() - start

        model.eval()
        record = {"part": "perplexity", "attention": attention, "window": window if attention == "sliding" else None,
                  "train_block_sparsity": {"dense": 0.0, "sliding": window_sparsity,
                                           "density": train_sparsity}[attention],
                  "val_ppl": {}, "val_block_sparsity": {}, "train_seconds": seconds,
                  "final_loss": statistics.fmean(result.losses[-10:]), "steps": args.steps,
                  "batch_size": args.batch_size, "seq_len": args.seq_len, "model": args.model,
                  "parameters": sum(p.numel() for p in model.parameters())}
        total_nll, total_tokens = 0.0, 0
        for name, dataset in val.items():
            if attention == "sliding":
                evaluation = sliding_evaluation(model, dataset, window)
            else:
                evaluation = evaluate_plan(model, dataset, PPL_PLAN if attention == "density" else None)
            record["val_ppl"][name] = evaluation.val_ppl
            record["val_block_sparsity"][name] = evaluation.block_sparsity
            total_nll += math.log(evaluation.val_ppl) * evaluation.tokens
            total_tokens += evaluation.tokens
        record["val_ppl"]["all"] = math.exp(total_nll / total_tokens)
        records.append(record)
        print(f"{attention}: trained {args.steps} steps in {seconds:.0f} s, held-out ppl "
              + ", ".join(f"{k} {v:.2f}" for k, v in record["val_ppl"].items()), flush=True)
        if args.json:
            atomic_write_text(args.json, json.dumps(records, indent=1) + "\n")
    return records


@torch.no_grad()
def sliding_evaluation(model: Transformer, dataset, window: int):
    """Measure held-out perplexity under the model's own sliding window, returned as evaluate_plan returns it."""
    from densa.train.tune import PlanEvaluation
    from densa.train.trainer import split_batch, token_loss

    total, count = 0.0, 0
    for first in range(0, len(dataset.tokens), 8):
        inputs, targets, _ = split_batch(dataset.tokens[first:first + 8], None)
        loss, n = token_loss(model(inputs), targets)
        total, count = total + float(loss), count + n
    sparsity = sliding_sparsity(dataset.seq_len, window, PPL_PLAN.block_size)
    return PlanEvaluation(math.exp(total / count), sparsity, 0.0, 0.0, count)


def format_perplexity(records: list[dict]) -> str:
    header = (f"{'attention':<10} {'window':>7} {'sparsity':>9} {'VCSum':>8} {'GovReport':>10} "
              f"{'annual':>8} {'all':>8} {'train s':>8}")
    lines = [header, "-" * len(header)]
    order = {"dense": 0, "sliding": 1, "density": 2}
    for r in sorted(records, key=lambda r: order[r["attention"]]):
        ppl = r["val_ppl"]
        lines.append(
            f"{r['attention']:<10} {r['window'] or '':>7} {r['train_block_sparsity']:>9.1%} {ppl['vcsum']:>8.2f} "
            f"{ppl['govreport']:>10.2f} {ppl['annual_report']:>8.2f} {ppl['all']:>8.2f} {r['train_seconds']:>8.0f}"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Part 2: can the final query reach an early fact through L layers of the mask?


def reachable_from_last(plan: BlockPlan, layers: int) -> torch.Tensor:
    """Bool [T]: keys whose information can reach the last query through `layers` causal attention layers.

    Exact at token level and never builds the T x T mask. Row q of the mask is
    the interval [q - window[q] + 1, q], or all of [0, q] when q is dense, plus
    every dense key up to q. One layer therefore maps the reachable set R to
    the union of those rows over q in R, which a difference array computes.
    The residual stream keeps R itself reachable.
    """
    T = plan.seq_len
    dense = plan.token_dense()
    window = plan.token_window()
    positions = torch.arange(T)
    reached = positions == T - 1
    for _ in range(layers):
        queries = reached.nonzero().flatten()
        starts = torch.where(dense[queries], 0, (queries - window[queries] + 1).clamp(min=0))
        diff = torch.zeros(T + 1, dtype=torch.long)
        diff.index_add_(0, starts, torch.ones_like(starts))
        diff.index_add_(0, queries + 1, -torch.ones_like(queries))
        covered = diff.cumsum(0)[:T] > 0
        reached = reached | covered | (dense & (positions <= queries.max()))
    return reached


def matched_window(seq_len: int, target: float, block_size: int) -> int:
    """Return the sliding window (a multiple of 8 tokens) whose block sparsity is closest to `target`.

    Sparsity falls in steps as the window grows, so a binary search finds the
    first window at or below `target`, and the closer of it and the window
    before it wins. Among the windows with that same sparsity the widest is
    returned, which is the best case for the sliding-window baseline.
    """
    steps = -(-seq_len // 8)
    low, high = 1, steps
    while low < high:
        middle = (low + high) // 2
        if sliding_sparsity(seq_len, 8 * middle, block_size) <= target:
            high = middle
        else:
            low = middle + 1
    candidates = [8 * low] + ([8 * (low - 1)] if low > 1 else [])
    window = min(candidates, key=lambda w: abs(sliding_sparsity(seq_len, w, block_size) - target))

    level = sliding_sparsity(seq_len, window, block_size)
    low, high = window // 8, steps
    while low < high:
        middle = (low + high + 1) // 2
        if sliding_sparsity(seq_len, 8 * middle, block_size) >= level:
            low = middle
        else:
            high = middle - 1
    return 8 * low


def long_texts(sources: dict[str, list[Document]], tokenizer: DensaTokenizer, length: int,
               per_source: int) -> list[tuple[str, str, str]]:
    """List (source, name, text) with at least `length` tokens each: a document, or consecutive ones joined.

    Text i of a source starts at its document i, so the texts differ in their
    opening, where the pass key mostly goes.
    """
    texts = []
    for source, docs in sources.items():
        for i in range(min(per_source, len(docs))):
            parts, tokens, j = [], 0, i
            while tokens < length and j < i + len(docs):
                doc = docs[j % len(docs)]
                parts.append(doc.text)
                tokens += len(tokenizer.encode(doc.text)[0])
                j += 1
            if tokens >= length:
                texts.append((source, f"{source}[{i}:{j}]", "\n\n".join(parts)))
    return texts


def passkey_sample(text: str, language: str, depth: float, key: str, tokenizer: DensaTokenizer,
                   length: int) -> tuple[str, list[tuple[int, int]]]:
    """Build a text of at most `length` tokens with the pass key at `depth`; return it and the key's char spans."""
    insert, question = PASSKEY[language].format(key=key), QUESTION[language]
    reserve = len(tokenizer.encode(insert + question)[0]) + 16
    ids, offsets = tokenizer.encode(text)
    body = text[: offsets[length - reserve][0]]

    # Insert after the first sentence end or line break at or past the depth.
    position = len(body) * depth
    ends = [body.find(mark, int(position)) for mark in ("\n", "。", ". ")]
    ends = [e + 1 for e in ends if e >= 0]
    position = min(ends) if ends else int(position)
    sample = body[:position] + insert + body[position:] + question
    first = sample.find(key, position)
    second = sample.find(key, first + len(key))
    return sample, [(first, first + len(key)), (second, second + len(key))]


def run_reachability(args: argparse.Namespace) -> list[dict]:
    sources = load_sources()
    tokenizer = DensaTokenizer.train([d.text for docs in sources.values() for d in docs], 8192)
    analyzer = DensityAnalyzer()
    generator = torch.Generator().manual_seed(args.seed)
    depths = [0.05 + 0.85 * i / max(args.depths - 1, 1) for i in range(args.depths)]
    records = []
    for length in args.lengths:
        texts = long_texts(sources, tokenizer, length, per_source=4)
        print(f"{length} tokens: {len(texts)} texts, {len(depths)} depths each", flush=True)
        for source, name, text in texts:
            language = "en" if source == "govreport" else "zh"
            for depth in depths:
                key = str(int(torch.randint(10000, 100000, (1,), generator=generator)))
                sample, key_spans = passkey_sample(text, language, depth, key, tokenizer, length)
                ids, offsets = tokenizer.encode(sample)
                density = analyzer.analyze(sample, offsets).density
                plan = plan_blocks(density, REACH_PLAN)
                T = len(ids)
                occurrences = [
                    torch.tensor([i for i, (a, b) in enumerate(offsets) if a < end and b > start])
                    for start, end in key_spans
                ]
                sparsity = plan.block_sparsity()
                window = matched_window(T, sparsity, REACH_PLAN.block_size)
                sliding = BlockPlan.sliding(T, window, REACH_PLAN.block_size)
                key_block_dense = bool(plan.dense[occurrences[0] // REACH_PLAN.block_size].any())
                for layers in args.layers:
                    density_reached = reachable_from_last(plan, layers)
                    sliding_reached = reachable_from_last(sliding, layers)
                    records.append({
                        "part": "reachability", "source": source, "document": name, "length": length,
                        "tokens": T, "depth": round(depth, 3), "key_token": int(occurrences[0][0]),
                        "layers": layers,
                        "density_reachable": any(bool(density_reached[o].all()) for o in occurrences),
                        "sliding_reachable": any(bool(sliding_reached[o].all()) for o in occurrences),
                        "density_sparsity": sparsity, "sliding_window": window,
                        "sliding_sparsity": sliding.block_sparsity(), "key_block_dense": key_block_dense,
                    })
    return records


def format_reachability(records: list[dict]) -> str:
    header = (f"{'tokens':>7} {'layers':>6} {'samples':>7} {'density':>8} {'sliding':>8} "
              f"{'density sp':>10} {'sliding sp':>10} {'window':>7} {'key dense':>9}")
    lines = [header, "-" * len(header)]
    groups: dict[tuple[int, int], list[dict]] = {}
    for r in records:
        groups.setdefault((r["length"], r["layers"]), []).append(r)
    for (length, layers), rows in sorted(groups.items()):
        lines.append(
            f"{length:>7} {layers:>6} {len(rows):>7} "
            f"{statistics.fmean(r['density_reachable'] for r in rows):>8.1%} "
            f"{statistics.fmean(r['sliding_reachable'] for r in rows):>8.1%} "
            f"{statistics.fmean(r['density_sparsity'] for r in rows):>10.1%} "
            f"{statistics.fmean(r['sliding_sparsity'] for r in rows):>10.1%} "
            f"{statistics.fmean(r['sliding_window'] for r in rows):>7.0f} "
            f"{statistics.fmean(r['key_block_dense'] for r in rows):>9.1%}"
        )

    # Reachable share by depth, both lengths together, at the largest layer count.
    layers = max(r["layers"] for r in records)
    by_depth: dict[float, list[dict]] = {}
    for r in records:
        if r["layers"] == layers:
            by_depth.setdefault(r["depth"], []).append(r)
    lines += ["", f"by depth, {layers} layers:", f"{'depth':>6} {'samples':>7} {'density':>8} {'sliding':>8}"]
    for depth, rows in sorted(by_depth.items()):
        lines.append(f"{depth:>6.0%} {len(rows):>7} {statistics.fmean(r['density_reachable'] for r in rows):>8.1%} "
                     f"{statistics.fmean(r['sliding_reachable'] for r in rows):>8.1%}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Entry point


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["perplexity", "reachability"],
                        choices=["perplexity", "reachability"], help="which parts to run")
    parser.add_argument("--json", type=Path, help="write the records to this file")
    parser.add_argument("--steps", type=int, default=1000, help="training steps per model")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per step")
    parser.add_argument("--model", choices=sorted(MODEL_SIZES), default="mini",
                        help="tiny: the tiny preset; mini: 128 wide, 4 layers (see MODEL_SIZES)")
    parser.add_argument("--seq-len", type=int, default=1024, help="tokens per training sequence")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    parser.add_argument("--eval-sequences", type=int, default=16, help="held-out sequences per source")
    parser.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary of the perplexity part")
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384],
                        help="document lengths of the reachability part, in tokens")
    parser.add_argument("--depths", type=int, default=10, help="pass-key depths per document, spread over 5-90%%")
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 2, 4, 8], help="layer counts to check")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--cache", type=Path, default=Path("runs/quality_cache"), help="packing cache folder")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    args = parser.parse_args(argv)
    positive = ("steps", "batch_size", "seq_len", "eval_sequences", "vocab_size", "depths", "threads")
    if any(getattr(args, name) < 1 for name in positive) or min(args.lengths) < 1 or min(args.layers) < 1:
        parser.error("--steps, --batch-size, --seq-len, --eval-sequences, --vocab-size, --depths, --threads, --lengths and "
                     "--layers must be positive")
    if args.seq_len < 2 * PPL_PLAN.block_size:
        parser.error(f"--seq-len {args.seq_len} is too short; use at least {2 * PPL_PLAN.block_size}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    missing = [str(p) for p in (VCSUM, GOVREPORT, ANNUAL_REPORT) if not p.is_file()]
    if missing:
        print(f"error: data not found: {', '.join(missing)}; this benchmark reads ../shared/data/longdoc",
              file=sys.stderr)
        return 2
    print(f"torch {torch.__version__}, {args.threads} threads, seed {args.seed}")

    records: list[dict] = []
    if "perplexity" in args.parts:
        print(f"perplexity: {args.model} model, seq_len {args.seq_len}, batch {args.batch_size}, {args.steps} steps, "
              f"lr {args.lr}, vocab {args.vocab_size}; plan {PPL_PLAN}", flush=True)
        records += run_perplexity(args)
        print()
        print(format_perplexity([r for r in records if r["part"] == "perplexity"]))
    if "reachability" in args.parts:
        print(f"\nreachability: lengths {args.lengths}, {args.depths} depths, layers {args.layers}; "
              f"plan {REACH_PLAN}", flush=True)
        records += run_reachability(args)
        print()
        print(format_reachability([r for r in records if r["part"] == "reachability"]))
    if args.json:
        atomic_write_text(args.json, json.dumps(records, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
