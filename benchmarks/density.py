"""Time density analysis and block planning on real long documents.

For each document: the first `--tokens` tokens of a byte-level BPE trained on
the document, then `DensityAnalyzer.analyze` and `plan_blocks` on one thread.
Reports the median of `--repeats` runs after a warm-up, the share of tokens at
or above the threshold, the dense-block share and the block sparsity.

    python benchmarks/density.py --json density.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from densa.data.corpus import builtin_corpus
from densa.data.readers import read_annual_report, read_govreport, read_vcsum
from densa.data.tokenizer import DensaTokenizer
from densa.density import DensityAnalyzer, PlanConfig, plan_blocks
from densa.io import atomic_write_text

LONGDOC = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "longdoc"


def documents() -> dict[str, str]:
    """Name -> text of at least 16K tokens, Chinese and English."""
    meetings = read_vcsum(LONGDOC / "vcsum" / "short_dev.txt")
    return {
        "vcsum (zh, meetings)": "\n\n".join(d.text for d in sorted(meetings, key=lambda d: -len(d.text))[:3]),
        "annual report (zh, finance)": read_annual_report(LONGDOC / "annual_reports" /
                                                          "601658_2019_annual_report.jsonl")[0].text,
        "govreport (en)": "\n\n".join(d.text for d in read_govreport(LONGDOC / "govreport" / "gov_report_summ.jsonl")),
        "cpython reference (en)": "\n\n".join(d.text for d in builtin_corpus()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16384, help="tokens analysed per document")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per document")
    parser.add_argument("--json", type=Path, help="write records here")
    args = parser.parse_args()
    torch.set_num_threads(1)

    analyzer = DensityAnalyzer()
    config = PlanConfig()
    records = []
    print(f"{'document':<30} {'tokens':>7} {'analyze ms':>11} {'plan ms':>8} {'>= 0.7':>7} {'dense blk':>9} "
          f"{'sparsity':>9}")
    for name, text in documents().items():
        tokenizer = DensaTokenizer.train([text], vocab_size=16384)
        ids, offsets = tokenizer.encode(text)
        ids, offsets = ids[: args.tokens], offsets[: args.tokens]
        text = text[: offsets[-1][1]]

        analyzer.analyze(text, offsets)  # warm-up: loads the reference tables
        analyze_times, plan_times = [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            density = analyzer.analyze(text, offsets).density
            analyze_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            plan = plan_blocks(density, config)
            plan.key_blocks(causal=True)
            plan_times.append(time.perf_counter() - start)

        record = {
            "document": name,
            "tokens": len(ids),
            "analyze_ms": 1000 * statistics.median(analyze_times),
            "plan_ms": 1000 * statistics.median(plan_times),
            "dense_token_share": float((density >= config.threshold).float().mean()),
            "dense_block_share": plan.dense_fraction(),
            "block_sparsity": plan.block_sparsity(),
        }
        records.append(record)
        print(f"{name:<30} {record['tokens']:>7} {record['analyze_ms']:>11.0f} {record['plan_ms']:>8.1f} "
              f"{record['dense_token_share']:>7.1%} {record['dense_block_share']:>9.1%} "
              f"{record['block_sparsity']:>9.1%}")

    print(f"\nmachine: {platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread")
    if args.json:
        atomic_write_text(args.json, json.dumps(records, indent=2) + "\n")


if __name__ == "__main__":
    main()
