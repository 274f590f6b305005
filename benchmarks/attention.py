"""Benchmark density-adaptive attention against dense causal SDPA on a real long document.

Runs F.scaled_dot_product_attention (dense, is_causal=True), the blocksparse
backend and compiled FlexAttention on the block plan of a real Chinese document
at several lengths, B=1, 8 heads, head dim 64, fp32, causal. For each it
reports the median forward time, and forward+backward for the trainable ones
(sdpa, blocksparse). It also reports peak tensor memory, block sparsity, the
speed-up over SDPA, the plan's ideal speed-up (dense blocks / computed blocks)
with the share of it reached, and the time spent building the plan.

Example:

    python benchmarks/attention.py --lengths 1024 4096 16384 --json attention.json

Legend: B batch, H heads, T tokens, D head dim.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import densa  # noqa: F401  (before torch: sets OMP_WAIT_POLICY)
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from torch.profiler._memory_profiler import Action

from densa.attention import blocksparse_attention, build_block_mask, flex_attention
from densa.attention.blocksparse import prepare_layout
from densa.cli import HelpFormatter
from densa.data.readers import read_annual_report, read_vcsum
from densa.density import DensityAnalyzer, plan_blocks
from densa.density.plan import BlockPlan
from densa.io import InputError, atomic_write_text

LONGDOC = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "longdoc"
ANNUAL_REPORT = LONGDOC / "annual_reports" / "601658_2019_annual_report.jsonl"
VCSUM = LONGDOC / "vcsum" / "short_dev.txt"
HEADS, HEAD_DIM = 8, 64
BACKENDS = ("sdpa", "blocksparse", "flex")
# BPE vocabulary of the tokenizer trained on the document itself.
VOCAB_SIZE = 8192



@dataclass
class Document:
    name: str
    text: str


def load_document(args: argparse.Namespace) -> Document:
    if args.document == "annual_report":
        report = read_annual_report(args.path or ANNUAL_REPORT)[0]
        page_starts = report.meta["page_starts"]
        if args.start_page not in page_starts:
            raise InputError(
                f"--start-page {args.start_page} is not a page of the report; "
                f"use a page between {min(page_starts)} and {max(page_starts)}"
            )
        start = page_starts[args.start_page]
        return Document(f"annual report from page {args.start_page}", report.text[start:])

    meetings = read_vcsum(args.path or VCSUM)
    if args.meeting is None:
        meeting = max(meetings, key=lambda doc: len(doc.text))
    elif 0 <= args.meeting < len(meetings):
        meeting = meetings[args.meeting]
    else:
        raise InputError(f"--meeting {args.meeting} is out of range; use 0 to {len(meetings) - 1}")
    return Document(f"VCSum meeting {meeting.meta['meeting_id']}", meeting.text)


def token_densities(document: Document, tokens: str, max_len: int) -> tuple[torch.Tensor, str]:
    """Score the document's first max_len tokens: return densities [T] and a description of the tokens."""
    analyzer = DensityAnalyzer()
    if tokens == "char":
        text = document.text[: max_len]
        return analyzer.analyze(text).density, "one token per character"

    from densa.data.tokenizer import DensaTokenizer

    tokenizer = DensaTokenizer.train([document.text], vocab_size=VOCAB_SIZE)
    _, offsets = tokenizer.encode(document.text)
    offsets = offsets[:max_len]
    text = document.text[: offsets[-1][1]]
    return analyzer.analyze(text, offsets).density, f"DensaTokenizer BPE ({VOCAB_SIZE} entries) trained on the document"


def median_ms(fn, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def peak_tensor_mb(fn) -> float:
    """Run fn once and return the peak CPU tensor memory (MB) it allocated, beyond tensors that existed before.

    Replays torch.profiler's memory timeline, the data behind
    `export_memory_timeline`: every tensor created or destroyed during fn, in
    order. A fused kernel's internal scratch buffers are not tensors, so the
    number is a lower bound.
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    # NOTE: _memory_profile is private in torch 2.13, and the public export_memory_timeline is deprecated.
    current = peak = 0
    for _, action, (key, _), size in prof._memory_profile().timeline:
        if key.device.type != "cpu":
            continue
        if action == Action.CREATE:
            current += size
        elif action == Action.DESTROY:
            current -= size
        peak = max(peak, current)
    return peak / 2**20


def make_cases(plan: BlockPlan, q, k, v):
    """Return a callable per (backend, pass)."""
    grad_out = torch.randn_like(q)

    def backward(out):
        out.backward(grad_out)
        # Freed after the pass, so peak_tensor_mb counts the gradients.
        for x in (q, k, v):
            x.grad = None

    def sdpa():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def sparse():
        return blocksparse_attention(q, k, v, plan, True)

    def flex():
        return flex_attention(q, k, v, plan, True)

    def no_grad(fn):
        def run():
            with torch.no_grad():
                fn()

        return run

    return {
        ("sdpa", "fwd"): no_grad(sdpa),
        ("sdpa", "fwd_bwd"): lambda: backward(sdpa()),
        ("blocksparse", "fwd"): no_grad(sparse),
        ("blocksparse", "fwd_bwd"): lambda: backward(sparse()),
        ("flex", "fwd"): no_grad(flex),
    }


def plan_timings(density: torch.Tensor, warmup: int, repeats: int) -> dict[str, float]:
    """Median ms to build, on a fresh plan each time, what each backend needs before it runs.

    plan_ms: plan_blocks plus the block count; layout_ms: the blocksparse
    decomposition on top; block_mask_ms: key_blocks and the flex BlockMask on top.
    """

    def plan_only():
        plan_blocks(density).computed_blocks(True)

    def layout():
        prepare_layout(plan_blocks(density), True)

    def block_mask():
        build_block_mask(plan_blocks(density), True)

    plan_ms = median_ms(plan_only, warmup, repeats)
    return {
        "plan_ms": plan_ms,
        "layout_ms": median_ms(layout, warmup, repeats) - plan_ms,
        "block_mask_ms": median_ms(block_mask, warmup, repeats) - plan_ms,
    }


def plan_scaling(density: torch.Tensor, lengths: list[int], repeats: int) -> list[dict]:
    """Plan construction time against length: per length, ms and microseconds per 1K tokens.

    Densities longer than the document repeat it, which keeps the share of
    dense candidates realistic.
    """
    records = []
    for length in lengths:
        tiled = density.repeat(-(-length // len(density)))[:length]
        timing = plan_timings(tiled, 1, repeats)
        blocksparse_ms = timing["plan_ms"] + timing["layout_ms"]
        records.append(
            {
                "kind": "plan_scaling",
                "length": length,
                "plan_ms": round(timing["plan_ms"], 3),
                "blocksparse_plan_ms": round(blocksparse_ms, 3),
                "flex_plan_ms": round(timing["plan_ms"] + timing["block_mask_ms"], 3),
                "blocksparse_us_per_1k_tokens": round(1e3 * blocksparse_ms / (length / 1024), 2),
            }
        )
    return records


def run_length(length: int, density: torch.Tensor, args) -> list[dict]:
    plan = plan_blocks(density[:length])
    sparsity, ideal = plan.block_sparsity(True), plan.ideal_speedup(True)
    q = torch.randn(1, HEADS, length, HEAD_DIM, requires_grad=True)
    k = torch.randn(1, HEADS, length, HEAD_DIM, requires_grad=True)
    v = torch.randn(1, HEADS, length, HEAD_DIM, requires_grad=True)
    cases = {key: fn for key, fn in make_cases(plan, q, k, v).items() if key[0] in args.backends}

    # First calls build the cached layout and BlockMask and compile flex; time them apart.
    first_call_ms = {}
    for key, fn in cases.items():
        start = time.perf_counter()
        fn()
        first_call_ms[key] = (time.perf_counter() - start) * 1e3

    # Interleave backends within each repeat, so load from other processes hits all of them alike.
    # Process CPU time is recorded too: with --threads 1 it barely moves under such load.
    times = {key: [] for key in cases}
    cpu_times = {key: [] for key in cases}
    for _ in range(args.warmup):
        for fn in cases.values():
            fn()
    for _ in range(args.repeats):
        for key, fn in cases.items():
            start, cpu_start = time.perf_counter(), time.process_time()
            fn()
            times[key].append((time.perf_counter() - start) * 1e3)
            cpu_times[key].append((time.process_time() - cpu_start) * 1e3)
    ms = {key: statistics.median(values) for key, values in times.items()}
    cpu_ms = {key: statistics.median(values) for key, values in cpu_times.items()}
    peaks = {key: peak_tensor_mb(fn) for key, fn in cases.items()}
    planning = plan_timings(density[:length], 1, args.repeats)

    records = []
    for (backend, pass_), value in ms.items():
        sdpa_ms = ms.get(("sdpa", pass_))
        speedup = sdpa_ms / value if sdpa_ms else math.nan
        sdpa_cpu_ms = cpu_ms.get(("sdpa", pass_))
        cpu_speedup = sdpa_cpu_ms / cpu_ms[(backend, pass_)] if sdpa_cpu_ms else math.nan
        plan_cost = planning["plan_ms"] + planning["block_mask_ms" if backend == "flex" else "layout_ms"]
        records.append(
            {
                "length": length,
                "backend": backend,
                "pass": pass_,
                "ms": round(value, 3),
                "peak_mb": round(peaks[(backend, pass_)], 2),
                "block_sparsity": round(sparsity, 4),
                "speedup_vs_sdpa": round(speedup, 3),
                "ideal_speedup": round(ideal, 3),
                "share_of_ideal": round(speedup / ideal, 3) if backend != "sdpa" else None,
                "cpu_ms": round(cpu_ms[(backend, pass_)], 3),
                "cpu_speedup_vs_sdpa": round(cpu_speedup, 3),
                "first_call_ms": round(first_call_ms[(backend, pass_)], 1),
                "plan_ms": round(plan_cost, 3) if backend != "sdpa" else None,
                "plan_share": round(plan_cost / value, 4) if backend != "sdpa" else None,
                "dense_blocks": int(plan.dense.sum()),
                "n_blocks": plan.n_blocks,
            }
        )
    return records


def format_table(records: list[dict]) -> str:
    header = (
        f"{'T':>6} {'backend':<12} {'pass':<8} {'ms':>10} {'peak MB':>9} {'sparsity':>9} "
        f"{'speed-up':>9} {'ideal':>7} {'of ideal':>9} {'plan %':>7} {'1st call ms':>12} {'cpu ms':>10} {'cpu x':>7}"
    )
    lines = [header, "-" * len(header)]
    for r in records:
        share = f"{100 * r['share_of_ideal']:.0f}%" if r["share_of_ideal"] is not None else "-"
        plan = f"{100 * r['plan_share']:.2f}" if r["plan_share"] is not None else "-"
        lines.append(
            f"{r['length']:>6} {r['backend']:<12} {r['pass']:<8} {r['ms']:>10.1f} {r['peak_mb']:>9.1f} "
            f"{r['block_sparsity']:>9.3f} {r['speedup_vs_sdpa']:>8.2f}x {r['ideal_speedup']:>6.2f}x "
            f"{share:>9} {plan:>7} {r['first_call_ms']:>12.0f} {r['cpu_ms']:>10.1f} {r['cpu_speedup_vs_sdpa']:>6.2f}x"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384], help="sequence lengths in tokens")
    parser.add_argument(
        "--document", choices=["annual_report", "vcsum"], default="annual_report",
        help="annual_report: the 2019 annual report of a Chinese bank; vcsum: a Chinese meeting transcript",
    )
    parser.add_argument(
        "--path", type=Path, default=None, help="file of the chosen document; None means the copy under ../shared/data/longdoc"
    )
    parser.add_argument(
        "--start-page", type=int, default=1, help="annual report page that the benchmarked text starts at"
    )
    parser.add_argument("--meeting", type=int, default=None, help="VCSum meeting index; None means the longest meeting")
    parser.add_argument(
        "--tokens", choices=["bpe", "char"], default="bpe",
        help="bpe: DensaTokenizer trained on the document; char: one token per character",
    )
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS), help="backends to run")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per case after the first call")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per case; the median is reported")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads")
    parser.add_argument(
        "--plan-lengths", type=int, nargs="*", default=[4096, 16384, 65536, 262144],
        help="lengths for the plan construction scaling table (the document repeats past its end); none skips it",
    )
    parser.add_argument("--json", type=Path, help="write one record per (length, backend, pass) to this file")
    parser.add_argument("--plan-json", type=Path, help="write the plan scaling records to this file")
    args = parser.parse_args(argv)
    if min(args.lengths) < 1 or args.repeats < 1 or args.warmup < 0 or args.threads < 1:
        parser.error("--lengths, --repeats and --threads must be positive and --warmup non-negative")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    try:
        document = load_document(args)
        density, tokenisation = token_densities(document, args.tokens, max(args.lengths))
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if len(density) < max(args.lengths):
        print(
            f"error: {document.name} has {len(density)} tokens with --tokens {args.tokens}, "
            f"fewer than --lengths {max(args.lengths)}; use shorter lengths, --tokens char or another document",
            file=sys.stderr,
        )
        return 2

    print(f"document: {document.name}; tokens: {tokenisation}")
    print(
        f"B=1, H={HEADS}, D={HEAD_DIM}, fp32, causal; torch {torch.__version__}, {args.threads} threads; "
        f"median of {args.repeats} runs after {args.warmup} warm-up"
    )
    records = []
    for length in args.lengths:
        print(f"running T={length} ...", file=sys.stderr, flush=True)
        records.extend(run_length(length, density, args))
    print(format_table(records))
    if args.plan_lengths:
        scaling = plan_scaling(density, args.plan_lengths, args.repeats)
        print("\nplan construction against length (ms; us per 1K tokens for blocksparse)")
        print(f"{'T':>7} {'plan':>8} {'blocksparse':>12} {'flex':>8} {'us/1K':>7}")
        for r in scaling:
            print(
                f"{r['length']:>7} {r['plan_ms']:>8.2f} {r['blocksparse_plan_ms']:>12.2f} {r['flex_plan_ms']:>8.2f} "
                f"{r['blocksparse_us_per_1k_tokens']:>7.1f}"
            )
        if args.plan_json:
            atomic_write_text(args.plan_json, json.dumps(scaling, indent=1) + "\n")
    print(
        "peak MB: peak CPU tensor memory allocated during one call beyond the inputs "
        "(torch.profiler memory timeline; a fused kernel's scratch buffers are not counted)\n"
        "speed-up: SDPA time / backend time for the same pass; ideal: dense blocks / computed blocks; "
        "plan %: plan_blocks plus the blocksparse layout, or key_blocks and the BlockMask for flex, "
        "as a share of the backend's time; "
        "1st call: includes layout caching and, for flex, compilation; "
        "cpu ms / cpu x: process CPU time and its speed-up, steadier than wall time on a shared machine "
        "when --threads 1"
    )
    if args.json:
        for record in records:
            record.update(document=document.name, tokens=args.tokens, threads=args.threads)
        atomic_write_text(args.json, json.dumps(records, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
