"""The main job: dense, sliding-window and density-adaptive attention trained side by side.

All three tiny models see the same tokenizer, data, steps and batches. Each
trains in its own child process so that its peak memory is its own.

Sequences are short here (512 tokens by default) so that the job fits in a
few CPU minutes. The plan's window ranges are therefore scaled down from the
library defaults (near 128-256, far 32-64 tokens at 128-token blocks) by the
same factor as the block size.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from densa.density.plan import BlockPlan, PlanConfig, plan_blocks
from densa.io import atomic_write_text
from densa.model.config import tiny
from densa.train.trainer import TrainConfig

logger = logging.getLogger(__name__)

VARIANTS = ("dense", "sliding", "density")
RESULT_KEYS = ("attention", "val_ppl", "tokens_per_s", "block_sparsity", "peak_mem_mb")


@dataclass(frozen=True)
class DemoConfig:
    steps: int = 80
    batch_size: int = 8
    seq_len: int = 512
    vocab_size: int = 4096
    lr: float = 3e-3
    seed: int = 0
    plan: PlanConfig = PlanConfig(block_size=32, near_window=(32, 64), far_window=(16, 32),
                                  near_tokens=64, far_tokens=256)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "vocab_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} is invalid; use a positive integer")
        if self.seq_len < 2 * self.plan.block_size:
            raise ValueError(f"seq_len={self.seq_len} is too short; use at least {2 * self.plan.block_size}")


def mean_sparsity(density: torch.Tensor, config: PlanConfig) -> float:
    """Mean block sparsity of the density plans of packed rows [S, T]."""
    return sum(plan_blocks(row, config).block_sparsity() for row in density) / len(density)


def matched_window(seq_len: int, target_sparsity: float, block_size: int) -> int:
    """Find the sliding window (a multiple of 8 tokens) whose block sparsity is closest to the target."""
    candidates = range(8, seq_len + 1, 8)
    return min(candidates, key=lambda w: abs(BlockPlan.sliding(seq_len, w, block_size).block_sparsity() - target_sparsity))


def train_variant(job: dict) -> dict:
    """Train one variant in a child process and return its row of the results table."""
    from densa.train.recipe import PreparedData, train_model

    torch.set_num_threads(job["threads"])
    log_file = Path(job["out"]) / "train.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, filename=log_file, filemode="w",
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    data = PreparedData(job["tokenizer"], job["train"], job["val"])
    result = train_model(job["model_config"], job["train_config"], data, job["out"])
    return {
        "attention": job["model_config"].attention,
        "val_ppl": result.val_ppl,
        "tokens_per_s": result.tokens_per_s,
        "block_sparsity": job["block_sparsity"],
        "peak_mem_mb": result.peak_mem_mb,
    }


def format_table(rows: list[dict]) -> str:
    header = f"{'attention':<10} {'val ppl':>9} {'tokens/s':>10} {'block sparsity':>15} {'peak mem MiB':>13}"
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(
            f"{row['attention']:<10} {row['val_ppl']:>9.2f} {row['tokens_per_s']:>10.0f} "
            f"{row['block_sparsity']:>15.1%} {row['peak_mem_mb']:>13.0f}"
        )
    return "\n".join(lines)


def run_demo(config: DemoConfig, out: Path, sample_tokens: int = 48) -> list[dict]:
    """Train the three variants, write results, heat map and sample; return the table rows."""
    from densa.data.corpus import builtin_corpus
    from densa.density import DensityAnalyzer
    from densa.density.viz import save_density_heatmap
    from densa.model.generate import generate
    from densa.train.checkpoint import load_model
    from densa.train.recipe import prepare_data

    out.mkdir(parents=True, exist_ok=True)
    documents = builtin_corpus()
    data = prepare_data(documents, config.seq_len, config.vocab_size, seed=config.seed, cache_dir=out / "cache")

    density_sparsity = mean_sparsity(data.train.density[:, :-1], config.plan)
    window = matched_window(config.seq_len, density_sparsity, config.plan.block_size)
    sliding_sparsity = BlockPlan.sliding(config.seq_len, window, config.plan.block_size).block_sparsity()
    logger.info("density plans skip %.1f%% of blocks; sliding window of %d tokens skips %.1f%%",
                100 * density_sparsity, window, 100 * sliding_sparsity)

    train_config = TrainConfig(steps=config.steps, batch_size=config.batch_size, lr=config.lr,
                               warmup_steps=max(config.steps // 10, 1), seed=config.seed, eval_batches=0)
    sparsity = {"dense": 0.0, "sliding": sliding_sparsity, "density": density_sparsity}
    context = multiprocessing.get_context("spawn")
    rows = []
    for attention in VARIANTS:
        model_config = tiny(config.vocab_size, attention=attention, window=window, plan=config.plan,
                            max_seq_len=config.seq_len)
        job = {"model_config": model_config, "train_config": train_config, "tokenizer": data.tokenizer,
               "train": data.train, "val": data.val, "out": str(out / attention),
               "block_sparsity": sparsity[attention], "threads": torch.get_num_threads()}
        print(f"training {attention} attention for {config.steps} steps (log: {out / attention / 'train.log'})",
              flush=True)
        with ProcessPoolExecutor(1, mp_context=context) as pool:
            rows.append(pool.submit(train_variant, job).result())

    atomic_write_text(out / "demo_results.json", json.dumps(rows, indent=2) + "\n")
    print()
    print(format_table(rows))

    # Heat map of the training sequence with the most high-density tokens, under the plan the model
    # trained with. Few stretches of the language reference reach the threshold, so an arbitrary
    # excerpt often has no dense block at all and would not show what the plan does.
    above = (data.train.density[:, :-1] >= config.plan.threshold).sum(1)  # [S]
    row = int(above.argmax())
    density = data.train.density[row, :-1]  # the last token is only a target
    plan = plan_blocks(density, config.plan)
    save_density_heatmap(density, plan, out / "density_heatmap.png",
                         title=f"token density of training sequence {row} (CPython reference)")
    print(f"\nresults: {out / 'demo_results.json'}\nheat map: {out / 'density_heatmap.png'}")

    model = load_model(out / "density" / "checkpoint")
    prompt = "The with statement"
    ids, offsets = data.tokenizer.encode(prompt)
    prompt_density = DensityAnalyzer().analyze(prompt, offsets).density[None]
    generator = torch.Generator().manual_seed(config.seed)
    tokens = generate(model, torch.tensor([ids]), sample_tokens, density=prompt_density, temperature=0.8,
                      top_k=40, generator=generator)
    print(f"\nsample from the density model:\n{data.tokenizer.decode(tokens[0].tolist())}")
    return rows
