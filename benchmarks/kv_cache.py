"""Benchmark the density-aware key/value cache against dense attention with a full cache.

For each context length, a small randomly initialised decoder (2 layers,
8 heads, 8 key/value heads, head dim 64, fp32, CPU) reads the first tokens of
a real long document and greedily decodes 256 more. Three configurations run,
each in a fresh subprocess:

* dense: dense causal attention, full cache, whole-prompt prefill (the usual
  serving setup);
* density: density-adaptive attention, density-aware cache, chunked prefill;
* density_full: density-adaptive attention with a full cache, the reference
  that the density-aware cache must match logit for logit.

The plan comes from the document itself: a DensaTokenizer BPE (at most 16384 entries)
trained on it, and token densities from DensityAnalyzer on the tokens' offsets.

What is measured. `kv_bytes_*` are the bytes of the per-layer key/value
tensors (and slot positions) held after decoding. `peak_mb_*` is the growth
of the subprocess's peak resident set size (VmHWM, reset just before
prefill) over its resident size at that point. It counts every allocation of
prefill and decoding (caches, activations, kernel scratch, the allocator's
slack) but not the model weights or the Python runtime.
`logits_max_abs_diff` is the largest absolute difference between the logits
of the density-aware cache and of the full cache under the same decode-time
mask, over the prompt's last token and every decoded token.

Example:

    python benchmarks/kv_cache.py --json kv_cache.json
    python benchmarks/kv_cache.py --long --json kv_cache_long.json

Legend: T tokens, V vocabulary.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from densa.data.readers import read_annual_report
from densa.io import atomic_write_text

LONGDOC = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "longdoc"
ANNUAL_REPORT = LONGDOC / "annual_reports" / "601658_2019_annual_report.jsonl"
VOCAB_SIZE = 16384
DEFAULT_CONTEXTS = [4096, 16384]
LONG_CONTEXTS = [32768, 65536]
CONFIGS = {
    # name: (attention pattern, cache, whether prefill is chunked)
    "dense": ("dense", "full", False),
    "density": ("density", "density", True),
    "density_full": ("density", "full", False),
}

log = logging.getLogger("benchmarks.kv_cache")


def model_config(context: int, decode: int):
    from densa.model.config import ModelConfig

    return ModelConfig(vocab_size=VOCAB_SIZE, dim=512, n_layers=2, n_heads=8, n_kv_heads=8, ffn_dim=1408,
                       max_seq_len=context + decode, attention="density")


def status_kb(field: str) -> int:
    """Read a memory field of /proc/self/status in KiB: VmRSS (resident now) or VmHWM (peak resident)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status; this benchmark measures memory on Linux only")


def reset_peak_rss() -> None:
    # Writing 5 to clear_refs resets VmHWM to the current RSS (Linux 4.0+).
    # ru_maxrss cannot serve: Linux carries the parent's peak across fork and exec.
    Path("/proc/self/clear_refs").write_text("5")


def run_worker(args: argparse.Namespace) -> None:
    """Run one configuration in this (fresh) process: prefill, decode, save logits and measurements."""
    from densa.attention.kv_cache import cache_bytes
    from densa.model.generate import decode_step, prefill
    from densa.model.llama import Transformer

    inputs = torch.load(args.worker_input, weights_only=True)
    prompt, density = inputs["ids"], inputs["density"]
    context = prompt.shape[1]
    attention, cache, chunked = CONFIGS[args.worker]
    torch.manual_seed(0)
    model = Transformer(model_config(context, args.decode).replace(attention=attention)).eval()
    logits = torch.empty(args.decode + 1, VOCAB_SIZE)  # [steps, V]
    tokens = torch.empty(args.decode, dtype=torch.long)

    # A short warm-up pages in the kernels' code, which would otherwise count
    # as about 140 MB of growth in every configuration. Its freed memory is
    # handed back to the system so that the run below cannot reuse it unseen.
    warm = min(context, 512)
    _, warm_state = prefill(model, prompt[:, :warm], density[:, :warm] if attention != "dense" else None,
                            cache, args.prefill_chunk // 4 if chunked else None, max_len=warm + 2)
    decode_step(model, warm_state, prompt[:, :1])
    del warm_state
    ctypes.CDLL("libc.so.6").malloc_trim(0)

    reset_peak_rss()
    rss_before = status_kb("VmRSS")
    start = time.perf_counter()
    step_logits, state = prefill(model, prompt, density if attention != "dense" else None, cache,
                                 args.prefill_chunk if chunked else None, max_len=context + args.decode)
    prefill_s = time.perf_counter() - start
    logits[0] = step_logits[0]
    start = time.perf_counter()
    for step in range(args.decode):
        token = step_logits.argmax(-1, keepdim=True)  # [1, 1]
        tokens[step] = token[0, 0]
        step_logits = decode_step(model, state, token)
        logits[step + 1] = step_logits[0]
    decode_s = time.perf_counter() - start
    peak_kb = status_kb("VmHWM")

    stats = {
        "peak_mb": (peak_kb - rss_before) / 1024,
        "kv_bytes": cache_bytes(state.caches),
        "prefill_s": prefill_s,
        "decode_s": decode_s,
    }
    if cache == "density":
        layer = state.caches[0]
        stats.update(kept_tokens=layer.layout.slots, ring=layer.layout.ring, stage_tokens=layer.layout.stage_len)
    if attention == "density":
        plan = state.context.plans[0]
        stats.update(block_sparsity=plan.block_sparsity(True), dense_blocks=int(plan.dense.sum()),
                     n_blocks=plan.n_blocks)
    torch.save({"logits": logits, "tokens": tokens, "stats": json.dumps(stats)}, args.worker_output)


def document_tokens(max_len: int) -> tuple[str, list[int], list[tuple[int, int]]]:
    """Return the annual report's text and its first `max_len` token ids and offsets under its own BPE."""
    from densa.data.tokenizer import DensaTokenizer

    text = read_annual_report(ANNUAL_REPORT)[0].text
    tokenizer = DensaTokenizer.train([text], VOCAB_SIZE)
    ids, offsets = tokenizer.encode(text)
    if len(ids) < max_len:
        raise SystemExit(f"the annual report has {len(ids)} tokens, fewer than the context {max_len}; "
                         "pass shorter --contexts")
    return text, ids[:max_len], offsets[:max_len]


def run_context(context: int, text: str, ids: list[int], offsets, args, workdir: Path) -> dict:
    from densa.density import DensityAnalyzer

    # Analyse only the text the context covers, as a caller holding that prompt would.
    prefix = text[: offsets[context - 1][1]]
    density = DensityAnalyzer().analyze(prefix, offsets[:context]).density
    inputs = workdir / f"inputs_{context}.pt"
    torch.save({"ids": torch.tensor([ids[:context]]), "density": density[None]}, inputs)

    results = {}
    for name in CONFIGS:
        output = workdir / f"{name}_{context}.pt"
        command = [sys.executable, __file__, "--worker", name, "--worker-input", str(inputs),
                   "--worker-output", str(output), "--decode", str(args.decode),
                   "--prefill-chunk", str(args.prefill_chunk)]
        log.info("context %d: running %s", context, name)
        subprocess.run(command, check=True)
        saved = torch.load(output, weights_only=True)
        results[name] = {**saved, "stats": json.loads(saved["stats"])}

    dense, density_run, reference = (results[name] for name in ("dense", "density", "density_full"))
    diff = (density_run["logits"] - reference["logits"]).abs().max().item()
    stats = density_run["stats"]
    return {
        "context": context,
        "decoded_tokens": args.decode,
        "prefill_chunk": args.prefill_chunk,
        "kv_bytes_full": dense["stats"]["kv_bytes"],
        "kv_bytes_density": stats["kv_bytes"],
        "kv_ratio": round(stats["kv_bytes"] / dense["stats"]["kv_bytes"], 4),
        "peak_mb_dense": round(dense["stats"]["peak_mb"], 1),
        "peak_mb_density": round(stats["peak_mb"], 1),
        "peak_mb_density_full_cache": round(reference["stats"]["peak_mb"], 1),
        "logits_max_abs_diff": diff,
        "greedy_tokens_equal": bool(torch.equal(density_run["tokens"], reference["tokens"])),
        "block_sparsity": round(stats["block_sparsity"], 4),
        "dense_blocks": stats["dense_blocks"],
        "n_blocks": stats["n_blocks"],
        "kept_tokens": stats["kept_tokens"],
        "ring": stats["ring"],
        "stage_tokens": stats["stage_tokens"],
        "prefill_s_dense": round(dense["stats"]["prefill_s"], 2),
        "prefill_s_density": round(stats["prefill_s"], 2),
        "decode_s_dense": round(dense["stats"]["decode_s"], 2),
        "decode_s_density": round(stats["decode_s"], 2),
    }


def format_table(records: list[dict]) -> str:
    lines = [
        "| context | block sparsity | KV full MB | KV density MB | KV ratio | peak MB dense | peak MB density "
        "| max abs logit diff | greedy tokens equal |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | :---: |",
    ]
    for r in records:
        lines.append(
            f"| {r['context']} | {r['block_sparsity']:.3f} | {r['kv_bytes_full'] / 2**20:.1f} "
            f"| {r['kv_bytes_density'] / 2**20:.2f} | {r['kv_ratio']:.3f} | {r['peak_mb_dense']:.0f} "
            f"| {r['peak_mb_density']:.0f} | {r['logits_max_abs_diff']:.1e} "
            f"| {'yes' if r['greedy_tokens_equal'] else 'no'} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--contexts", type=int, nargs="+", default=DEFAULT_CONTEXTS,
                        help="prompt lengths in tokens")
    parser.add_argument("--long", action="store_true",
                        help=f"also run the chunked-prefill contexts {LONG_CONTEXTS}")
    parser.add_argument("--decode", type=int, default=256, help="tokens to decode after the prompt")
    parser.add_argument("--prefill-chunk", type=int, default=2048,
                        help="queries per prefill chunk for the density-aware cache")
    parser.add_argument("--json", type=Path, help="write one record per context to this JSON file")
    # Internal: one configuration in a fresh subprocess.
    parser.add_argument("--worker", choices=sorted(CONFIGS), help=argparse.SUPPRESS)
    parser.add_argument("--worker-input", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--worker-output", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.decode < 1 or args.prefill_chunk < 1 or min(args.contexts) < 1:
        parser.error("--contexts, --decode and --prefill-chunk need positive values")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.worker:
        run_worker(args)
        return
    contexts = sorted(set(args.contexts + (LONG_CONTEXTS if args.long else [])))
    text, ids, offsets = document_tokens(max(contexts))
    records = []
    with tempfile.TemporaryDirectory() as workdir:
        for context in contexts:
            records.append(run_context(context, text, ids, offsets, args, Path(workdir)))
            log.info("%s", json.dumps(records[-1]))
    print(format_table(records))
    if args.json:
        atomic_write_text(args.json, json.dumps(records, indent=2) + "\n")


if __name__ == "__main__":
    main()
