"""Momentum queue against in-batch negatives on held-out emoji, plus index search latency.

Both methods train the same encoder from the same initialisation, on the same
training images, with the same tokenizer, steps, batch and learning rate. Only
the source of negatives differs. Evaluation uses images (and their English
and Chinese names) that training never saw. Each method runs once per seed
in --seeds, and the table ends with the mean and standard deviation over
seeds. Each method is evaluated twice: with the last weights, and with an
EMA of its weights (rows ending in _ema, TrainResult.average_model). For
moco_queue that is the EMA key encoder. For in_batch it is the same average,
kept only for evaluation.

    python benchmarks/align.py --json align.json
    python benchmarks/align.py --json val.json --validation   # choose settings here

Settings are chosen with --validation, which holds out part of the training
images, so the held-out images never steer a choice.

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


def run_method(method: str, seed: int, args, train_set, eval_set, tokenizer) -> list[dict]:
    """Train one model with `method` and training seed `seed`; return one record per caption language."""
    config = PRESETS[args.config](vocab_size=tokenizer.vocab_size, image_size=args.image_size)
    torch.manual_seed(seed)
    model = AlignModel(config)
    contrast = ContrastConfig(method=method, queue_size=args.queue_size, momentum=args.momentum,
                              temperature=args.temperature)
    train_config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                               warmup_steps=args.warmup_steps, seed=seed, log_every=max(args.steps // 10, 1))
    tokens = CaptionTokens(train_set.captions, tokenizer, config.max_text_len)
    result = train_align(model, contrast, train_config, train_set, tokens)
    eval_tokens = CaptionTokens(eval_set.captions, tokenizer, config.max_text_len)
    # Both methods yield an EMA of their weights with the same decay (moco_queue's key encoder), so the
    # _ema rows also differ only in the source of negatives.
    evaluated = {method: model, f"{method}_ema": result.average_model}
    records = []
    for name, evaluated_model in evaluated.items():
        metrics = evaluate(evaluated_model, eval_set, eval_tokens, n_candidates=args.n_candidates)
        for lang, values in metrics.items():
            record = {"method": name, "seed": seed, "steps": args.steps, "batch_size": args.batch_size,
                      "lang": lang}
            record.update({key: values[key] for key in KEYS})
            record.update(images_per_s=result.images_per_s, n_images=values["n_images"],
                          final_loss=statistics.fmean(result.losses[-20:]), chance=values["chance"])
            records.append(record)
    return records


def summarize(records: list[dict]) -> list[dict]:
    """Return the mean and sample standard deviation over seeds of each metric, per method and language."""
    summary = []
    methods = list(dict.fromkeys(r["method"] for r in records))  # in order of first appearance
    groups = sorted({(r["method"], r["lang"]) for r in records}, key=lambda g: (methods.index(g[0]), g[1]))
    for method, lang in groups:
        group = [r for r in records if r["method"] == method and r["lang"] == lang]
        row = {"method": method, "lang": lang, "seeds": len(group)}
        for key in KEYS:
            values = [r[key] for r in group]
            row[key] = statistics.fmean(values)
            row[key + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        summary.append(row)
    return summary


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


def markdown(records: list[dict], summary: list[dict], search: dict, chance: dict) -> str:
    header = "| R@1 t2i | R@1 i2t | R@5 t2i | R@5 i2t | R@10 t2i | R@10 i2t | match acc |"
    lines = ["| method | seed | lang " + header + " images/s |",
             "| --- | ---: | --- " + "| ---: " * len(KEYS) + "| ---: |"]
    for r in records:
        cells = [r["method"], str(r["seed"]), r["lang"]] + [f"{100 * r[key]:.1f}" for key in KEYS]
        cells.append(f"{r['images_per_s']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    cells = ["chance", "", ""] + [f"{100 * chance[key]:.1f}" for key in KEYS] + [""]
    lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Mean ± sample standard deviation over seeds:", "",
              "| method | lang | seeds " + header, "| --- | --- | ---: " + "| ---: " * len(KEYS) + "|"]
    for row in summary:
        cells = [row["method"], row["lang"], str(row["seeds"])]
        cells += [f"{100 * row[key]:.1f} ± {100 * row[key + '_std']:.1f}" for key in KEYS]
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
    # Batch 16 leaves 15 in-batch negatives, the regime that a queue of negatives is for.
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--queue-size", type=int, default=1024)
    parser.add_argument("--momentum", type=float, default=0.995)
    parser.add_argument("--temperature", type=float, default=0.1)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--n-candidates", type=int, default=10)
    parser.add_argument("--eval-fraction", type=float, default=0.2)
    parser.add_argument("--seeds", default="0,1,2",
                        help="comma-separated training seeds (initialisation and batch order); each method runs once "
                             "per seed")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the train / held-out split")
    parser.add_argument("--validation", action="store_true",
                        help="evaluate on a validation split carved from the training images (same fraction) "
                             "instead of the held-out images; use it to choose settings")
    parser.add_argument("--index-items", type=int, default=10_000)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1 keeps numbers stable on a shared machine)")
    parser.add_argument("--cache-dir", default=None, help="emoji image cache folder")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)

    seeds = [int(seed) for seed in args.seeds.split(",")]
    pairs = emoji_pairs(args.image_size, cache_dir=args.cache_dir)
    train_items, eval_items = split_items(len(pairs), args.eval_fraction, args.split_seed)
    train_set, eval_set = pairs.subset(train_items), pairs.subset(eval_items)
    if args.validation:
        fit_items, validation_items = split_items(len(train_set), args.eval_fraction, args.split_seed)
        train_set, eval_set = train_set.subset(fit_items), train_set.subset(validation_items)
    tokenizer = DensaTokenizer.train(train_set.captions, args.vocab_size)
    logger.info("%d training images, %d %s images", len(train_set), len(eval_set),
                "validation" if args.validation else "held-out")

    records = []
    for seed in seeds:
        for method in args.methods.split(","):
            records += run_method(method, seed, args, train_set, eval_set, tokenizer)
    # Every language has one caption per image here, so chance is the same for all records.
    chance = records[0].pop("chance")
    for record in records:
        record.pop("chance", None)
    summary = summarize(records)
    embed_dim = PRESETS[args.config](vocab_size=tokenizer.vocab_size).embed_dim
    search = time_index_search(args.index_items, embed_dim)

    output = {
        "setup": {**vars(args), "train_images": len(train_set), "eval_images": len(eval_set),
                  "torch": torch.__version__, "machine": platform.processor() or platform.machine()},
        "records": records,
        "summary": summary,
        "chance": chance,
        "index_search": search,
    }
    atomic_write_text(args.json, json.dumps(output, indent=2) + "\n")
    print(markdown(records, summary, search, chance))


if __name__ == "__main__":
    main()
