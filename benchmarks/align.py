"""Momentum queue against in-batch negatives on held-out emoji, plus index search latency.

Both methods train the same encoder from the same initialisation, on the same
training images, with the same tokenizer, steps, batch and learning rate. Only
the source of negatives differs. Evaluation uses images (and their English
and Chinese names) that training never saw.

    python benchmarks/align.py --json align.json

Needs the emoji font: apt-get install fonts-noto-color-emoji.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import time

import torch

from densa.data.tokenizer import DensaTokenizer
from densa.io import atomic_write_text
from densa.multimodal.data import CaptionTokens, emoji_pairs, split_items
from densa.multimodal.encoder import PRESETS
from densa.multimodal.heads import AlignModel
from densa.multimodal.index import RetrievalIndex
from densa.multimodal.moco import ContrastConfig
from densa.multimodal.train import TrainConfig, evaluate, train_align

logger = logging.getLogger("benchmarks.align")

METHODS = ("moco_queue", "in_batch")
KEYS = ("r1_t2i", "r1_i2t", "r5_t2i", "r5_i2t", "r10_t2i", "r10_i2t", "match_acc")


def run_method(method: str, args, train_set, eval_set, tokenizer) -> tuple[list[dict], dict]:
    config = PRESETS[args.config](vocab_size=tokenizer.vocab_size, image_size=args.image_size)
    torch.manual_seed(args.seed)
    model = AlignModel(config)
    contrast = ContrastConfig(method=method, queue_size=args.queue_size, momentum=args.momentum,
                              temperature=args.temperature)
    train_config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                               warmup_steps=args.warmup_steps, seed=args.seed, log_every=max(args.steps // 10, 1))
    tokens = CaptionTokens(train_set.captions, tokenizer, config.max_text_len)
    result = train_align(model, contrast, train_config, train_set, tokens)
    metrics = evaluate(model, eval_set, CaptionTokens(eval_set.captions, tokenizer, config.max_text_len),
                       n_candidates=args.n_candidates)
    records = []
    for lang, values in metrics.items():
        record = {"method": method, "steps": args.steps, "batch_size": args.batch_size, "lang": lang}
        record.update({key: values[key] for key in KEYS})
        record.update(images_per_s=result.images_per_s, n_images=values["n_images"],
                      final_loss=statistics.fmean(result.losses[-20:]))
        records.append(record)
    return records, metrics


def time_index_search(n_items: int, dim: int, repeats: int = 50) -> dict:
    """Return median latency of one query, and of 100 queries, against n_items unit vectors."""
    generator = torch.Generator().manual_seed(0)
    index = RetrievalIndex(torch.randn(n_items, dim, generator=generator), [str(i) for i in range(n_items)])
    timings = {}
    for n_queries in (1, 100):
        queries = torch.randn(n_queries, dim, generator=generator)
        index.search(queries, k=10)  # warm up
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            index.search(queries, k=10)
            samples.append(time.perf_counter() - start)
        timings[n_queries] = statistics.median(samples)
    return {"items": n_items, "dim": dim, "k": 10, "ms_per_query": 1000 * timings[1],
            "ms_per_100_queries": 1000 * timings[100]}


def markdown(records: list[dict], search: dict, chance: dict) -> str:
    lines = [
        "| method | lang | steps | R@1 t2i | R@1 i2t | R@5 t2i | R@5 i2t | R@10 t2i | R@10 i2t | match acc | images/s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in records:
        cells = [r["method"], r["lang"], str(r["steps"])] + [f"{100 * r[key]:.1f}" for key in
                                                             ("r1_t2i", "r1_i2t", "r5_t2i", "r5_i2t", "r10_t2i",
                                                              "r10_i2t", "match_acc")]
        cells.append(f"{r['images_per_s']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    cells = ["chance", "", ""] + [f"{100 * chance[key]:.1f}" for key in
                                  ("r1_t2i", "r1_i2t", "r5_t2i", "r5_i2t", "r10_t2i", "r10_i2t", "match_acc")] + [""]
    lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Index search over {search['items']:,} items (dim {search['dim']}, top {search['k']}): "
                 f"{search['ms_per_query']:.2f} ms for one query, {search['ms_per_100_queries']:.2f} ms for 100.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", required=True, help="file to write the records to")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods to run")
    parser.add_argument("--config", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--queue-size", type=int, default=1024)
    parser.add_argument("--momentum", type=float, default=0.995)
    parser.add_argument("--temperature", type=float, default=0.1)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--n-candidates", type=int, default=10)
    parser.add_argument("--eval-fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--index-items", type=int, default=10_000)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1 keeps numbers stable on a shared machine)")
    parser.add_argument("--cache-dir", default=None, help="emoji image cache folder")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)

    pairs = emoji_pairs(args.image_size, cache_dir=args.cache_dir)
    train_items, eval_items = split_items(len(pairs), args.eval_fraction, args.seed)
    train_set, eval_set = pairs.subset(train_items), pairs.subset(eval_items)
    tokenizer = DensaTokenizer.train(train_set.captions, args.vocab_size)
    logger.info("%d training images, %d held-out images", len(train_set), len(eval_set))

    records = []
    for method in args.methods.split(","):
        method_records, metrics = run_method(method, args, train_set, eval_set, tokenizer)
        records += method_records
    # Every language has one caption per image here, so chance is the same for all records.
    chance = next(iter(metrics.values()))["chance"]
    embed_dim = PRESETS[args.config](vocab_size=tokenizer.vocab_size).embed_dim
    search = time_index_search(args.index_items, embed_dim)

    output = {
        "setup": {**vars(args), "train_images": len(train_set), "eval_images": len(eval_set),
                  "torch": torch.__version__, "machine": platform.processor() or platform.machine()},
        "records": records,
        "chance": chance,
        "index_search": search,
    }
    atomic_write_text(args.json, json.dumps(output, indent=2) + "\n")
    print(markdown(records, search, chance))


if __name__ == "__main__":
    main()
