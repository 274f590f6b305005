"""Window tuning: held-out perplexity and block sparsity over a grid of plan settings.

The block plan only decides which keys each query may see, so one set of
weights can run under any plan. `tune_windows` therefore evaluates a single
trained model (or a loaded checkpoint) under every combination of near window,
far window and density threshold, and records perplexity, mean block sparsity
and wall-clock time for each. The configurations that no other one beats on
both perplexity and sparsity form the Pareto front.

NOTE: the model was trained under one plan, so a plan far from it also
measures how well the weights tolerate a changed mask. A plan looser than the
training plan usually costs nothing, and a much tighter one costs more than it
would for a model trained under it.

Legend: S sequences, T tokens, N kernel blocks.
"""

from __future__ import annotations

import itertools
import logging
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from densa.density.plan import PlanConfig, plan_blocks
from densa.io import atomic_path
from densa.model.llama import AttentionContext, Transformer
from densa.train.trainer import split_batch, token_loss

logger = logging.getLogger(__name__)

# Distances (in blocks) over which windows shrink, as in PlanConfig's defaults:
# 256 and 1024 tokens at 128-token blocks.
NEAR_BLOCKS, FAR_BLOCKS = 2, 8
RESULT_KEYS = ("near_window", "far_window", "threshold", "val_ppl", "block_sparsity", "dense_fraction",
               "seconds", "tokens_per_s", "pareto")


def parse_window(text: str) -> tuple[int, int]:
    """Parse "MAX" or "MIN:MAX" (tokens) into a (min, max) window range.

    A single number W means the range (W // 2, W), the ratio of the library
    defaults (near 128-256, far 32-64 tokens).
    """
    parts = str(text).split(":")
    if len(parts) > 2:
        raise ValueError(f"window {text!r} is invalid; write MAX or MIN:MAX in tokens, such as 128 or 64:128")
    try:
        values = [int(part) for part in parts]
    except ValueError:
        raise ValueError(
            f"window {text!r} is invalid; write MAX or MIN:MAX in whole tokens, such as 128 or 64:128"
        ) from None
    low, high = (max(values[0] // 2, 1), values[0]) if len(values) == 1 else values
    if not 1 <= low <= high:
        raise ValueError(f"window {text!r} is invalid; use 1 <= MIN <= MAX tokens, such as 64:128")
    return low, high


def format_window(window: tuple[int, int]) -> str:
    return f"{window[0]}:{window[1]}"


@dataclass(frozen=True)
class TuneGrid:
    """The plan settings to try. Windows are (min, max) ranges in tokens.

    Every combination of `near_windows`, `far_windows` and `thresholds` is
    evaluated, except those whose far window is wider than the near window,
    because the plan is meant to narrow with distance from dense text.
    `near_tokens` and `far_tokens` scale with the block size (2 and 8
    blocks, the library defaults' ratio).
    """

    near_windows: tuple[tuple[int, int], ...]
    far_windows: tuple[tuple[int, int], ...]
    thresholds: tuple[float, ...]
    seq_len: int
    block_size: int = 64
    max_dense_fraction: float = 0.02

    def __post_init__(self) -> None:
        for name in ("near_windows", "far_windows", "thresholds"):
            values = tuple(getattr(self, name))
            if not values:
                raise ValueError(f"{name} is empty; give at least one value")
            object.__setattr__(self, name, values)
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size={self.block_size} is invalid; use a power of two >= 16, such as 64")
        if self.seq_len < 2 * self.block_size:
            raise ValueError(
                f"seq_len={self.seq_len} is too short for block_size={self.block_size}; "
                f"use a seq_len of at least {2 * self.block_size} tokens"
            )
        for name in ("near_windows", "far_windows"):
            for window in getattr(self, name):
                low, high = window
                if not 1 <= low <= high:
                    raise ValueError(f"{name} entry {window} is invalid; use (min, max) with 1 <= min <= max")
                if high > self.seq_len:
                    raise ValueError(
                        f"{name} entry {format_window(window)} exceeds seq_len={self.seq_len}; "
                        f"use windows of at most {self.seq_len} tokens"
                    )
        for threshold in self.thresholds:
            if not 0.0 < threshold <= 1.0:
                raise ValueError(f"threshold {threshold} is invalid; use values in (0, 1], such as 0.7")
        if not 0.0 <= self.max_dense_fraction <= 1.0:
            raise ValueError(f"max_dense_fraction={self.max_dense_fraction} is invalid; use a value in [0, 1]")
        if not self.plan_configs():
            raise ValueError(
                "every far window is wider than every near window; give far windows no wider than a near window"
            )

    def plan_config(self, near: tuple[int, int], far: tuple[int, int], threshold: float) -> PlanConfig:
        return PlanConfig(threshold=threshold, block_size=self.block_size, near_window=near, far_window=far,
                          near_tokens=NEAR_BLOCKS * self.block_size, far_tokens=FAR_BLOCKS * self.block_size,
                          max_dense_fraction=self.max_dense_fraction)

    def plan_configs(self) -> list[PlanConfig]:
        """List the grid's plan configs, near window slowest and threshold fastest."""
        return [
            self.plan_config(near, far, threshold)
            for near, far, threshold in itertools.product(self.near_windows, self.far_windows, self.thresholds)
            if far[1] <= near[1]
        ]

    def middle(self) -> PlanConfig:
        """Return the plan config at the median of each axis, which a model is trained under before tuning."""

        def median(values):
            ordered = sorted(values)
            return ordered[(len(ordered) - 1) // 2]

        near, far = median(self.near_windows), median(self.far_windows)
        if far[1] > near[1]:
            far = max((w for w in self.far_windows if w[1] <= near[1]), default=(near[0], near[1]))
        return self.plan_config(near, far, median(self.thresholds))


@dataclass
class PlanEvaluation:
    val_ppl: float
    block_sparsity: float
    dense_fraction: float
    seconds: float
    tokens: int


@torch.no_grad()
def evaluate_plan(
    model: Transformer, dataset, plan: PlanConfig | None, batch_size: int = 8, max_sequences: int = 0
) -> PlanEvaluation:
    """Measure the held-out perplexity of `model` on packed `dataset` with every sequence planned by `plan`.

    `plan=None` runs dense causal attention instead. The time covers plan
    building and the forward passes, which is what a plan changes at inference.
    `max_sequences` caps the sequences evaluated (0: all).
    """
    was_training = model.training
    model.eval()
    n = len(dataset.tokens) if not max_sequences else min(max_sequences, len(dataset.tokens))
    total_loss, total_tokens, sparsities, dense_fractions = 0.0, 0, [], []
    start = time.perf_counter()
    for first in range(0, n, batch_size):
        rows = slice(first, min(first + batch_size, n))
        inputs, targets, density = split_batch(dataset.tokens[rows], dataset.density[rows])
        B, T = inputs.shape
        if plan is None:
            context = AttentionContext("dense")
        else:
            plans = [plan_blocks(row, plan) for row in density]
            sparsities += [p.block_sparsity() for p in plans]
            dense_fractions += [p.dense_fraction() for p in plans]
            context = AttentionContext("density", True, plans, model.config.backend)
        logits = model(inputs, context=context)  # [B, T, V]
        loss, count = token_loss(logits, targets)
        total_loss += float(loss)
        total_tokens += count
    seconds = time.perf_counter() - start
    model.train(was_training)
    return PlanEvaluation(
        val_ppl=math.exp(total_loss / total_tokens),
        block_sparsity=statistics.fmean(sparsities) if sparsities else 0.0,
        dense_fraction=statistics.fmean(dense_fractions) if dense_fractions else 1.0,
        seconds=seconds,
        tokens=total_tokens,
    )


def pareto_front(points: Sequence[Sequence[float]], maximize: Sequence[bool]) -> list[bool]:
    """Mark the points that no other point dominates.

    Objective j is maximised where `maximize[j]` is true, else minimised. A
    point dominates another when it is at least as good on every objective and
    strictly better on one, so exact duplicates are both on the front.
    """
    signs = [-1.0 if up else 1.0 for up in maximize]
    # Flip maximised objectives so that smaller is better everywhere.
    costs = [[sign * value for sign, value in zip(signs, point, strict=True)] for point in points]

    def dominates(a, b):
        return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))

    return [not any(dominates(other, cost) for other in costs if other is not cost) for cost in costs]


def tune_windows(
    model: Transformer, dataset, grid: TuneGrid, batch_size: int = 8, max_sequences: int = 0
) -> tuple[dict, list[dict]]:
    """Evaluate every plan config of `grid`; return (dense reference row, one row per config).

    Rows carry RESULT_KEYS. `pareto` marks the front on (perplexity down,
    block sparsity up). Time is reported but not an objective, because it
    follows sparsity and CPU timings vary by several percent between runs.
    """
    configs = grid.plan_configs()
    skipped = len(grid.near_windows) * len(grid.far_windows) * len(grid.thresholds) - len(configs)
    if skipped:
        logger.info("skipping %d combinations whose far window is wider than the near window", skipped)

    dense = evaluate_plan(model, dataset, None, batch_size, max_sequences)
    reference = {"attention": "dense", "val_ppl": dense.val_ppl, "block_sparsity": 0.0,
                 "seconds": dense.seconds, "tokens_per_s": dense.tokens / dense.seconds}
    logger.info("dense attention: val ppl %.3f in %.2f s", dense.val_ppl, dense.seconds)

    rows = []
    for i, config in enumerate(configs):
        result = evaluate_plan(model, dataset, config, batch_size, max_sequences)
        rows.append({
            "near_window": list(config.near_window),
            "far_window": list(config.far_window),
            "threshold": config.threshold,
            "val_ppl": result.val_ppl,
            "block_sparsity": result.block_sparsity,
            "dense_fraction": result.dense_fraction,
            "seconds": result.seconds,
            "tokens_per_s": result.tokens / result.seconds,
        })
        logger.info("config %d/%d near %s far %s threshold %.2f: val ppl %.3f, block sparsity %.1f%%, %.2f s",
                    i + 1, len(configs), format_window(config.near_window), format_window(config.far_window),
                    config.threshold, result.val_ppl, 100 * result.block_sparsity, result.seconds)

    front = pareto_front([(row["val_ppl"], row["block_sparsity"]) for row in rows], maximize=(False, True))
    for row, on_front in zip(rows, front):
        row["pareto"] = on_front
    return reference, rows


def format_table(reference: dict, rows: list[dict]) -> str:
    """Format the grid as a fixed-width table with front rows marked "*" and dense attention last."""
    header = (f"{'near':>9} {'far':>9} {'threshold':>9} {'val ppl':>9} {'sparsity':>9} "
              f"{'dense blk':>9} {'seconds':>8} {'front':>5}")
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(
            f"{format_window(row['near_window']):>9} {format_window(row['far_window']):>9} "
            f"{row['threshold']:>9.2f} {row['val_ppl']:>9.3f} {row['block_sparsity']:>9.1%} "
            f"{row['dense_fraction']:>9.1%} {row['seconds']:>8.2f} {'*' if row['pareto'] else '':>5}"
        )
    lines.append(
        f"{'dense attention':>29} {reference['val_ppl']:>9.3f} {0.0:>9.1%} {'':>9} {reference['seconds']:>8.2f}"
    )
    return "\n".join(lines)


def save_pareto_plot(reference: dict, rows: list[dict], path: str | Path, title: str = "") -> None:
    """Scatter perplexity against block sparsity, the front highlighted and joined, dense as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    others = [row for row in rows if not row["pareto"]]
    front = sorted((row for row in rows if row["pareto"]), key=lambda row: row["block_sparsity"])
    ax.scatter([100 * r["block_sparsity"] for r in others], [r["val_ppl"] for r in others],
               color="0.6", label="grid configuration")
    ax.plot([100 * r["block_sparsity"] for r in front], [r["val_ppl"] for r in front], "o-",
            color="tab:red", label="Pareto front: near / far window (tokens) @ threshold")
    # Configurations that give the same plans share a point, so each point gets
    # one label plus a count of the others.
    labels: dict[tuple[float, float], list[str]] = {}
    for row in front:
        label = (f"{format_window(row['near_window'])} / {format_window(row['far_window'])} "
                 f"@ {row['threshold']:g}")
        labels.setdefault((100 * row["block_sparsity"], row["val_ppl"]), []).append(label)
    for point, names in labels.items():
        text = names[0] if len(names) == 1 else f"{names[0]} (+{len(names) - 1} same)"
        ax.annotate(text, point, textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.axhline(reference["val_ppl"], color="tab:blue", linestyle="--", label="dense attention")
    ax.set_xlabel("block sparsity (%)")
    ax.set_ylabel("held-out perplexity")
    ax.set_title(title or "window tuning")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
