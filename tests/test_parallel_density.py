"""Density attention and gradient clipping in the parallel engine against one process (gloo, real processes).

The densities come from DensityAnalyzer on the first lines of a real annual
report, one token per character, so the block plans differ from sequence to
sequence. The plan's block size and windows are scaled down to 64-token
sequences, where the default 128-token blocks would make every plan a single
block.
"""

import json
from pathlib import Path

import pytest
import torch

from densa.density import DensityAnalyzer
from densa.density.plan import PlanConfig, plan_blocks
from densa.model.config import ModelConfig
from densa.model.llama import Transformer
from densa.train.parallel.engine import EngineConfig, reference_loss

from test_parallel_engine import check_layout, run_world

REPORT = (Path(__file__).resolve().parents[1].parent / "shared" / "data" / "longdoc" / "annual_reports"
          / "601658_2019_annual_report.jsonl")
SEQ_LEN = 64
VOCAB = 96
PLAN = PlanConfig(block_size=16, near_window=(8, 16), far_window=(4, 8), near_tokens=16, far_tokens=32,
                  max_dense_fraction=0.5)
# Far below the gradient norm of the first step (checked below), so every step clips.
SMALL_CLIP = 1e-3


def density_config() -> ModelConfig:
    return ModelConfig(vocab_size=VOCAB, dim=64, n_layers=4, n_heads=8, n_kv_heads=4, ffn_dim=128,
                       max_seq_len=SEQ_LEN, attention="density", plan=PLAN)


def report_text(n_chars: int) -> str:
    lines = []
    with REPORT.open(encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if row["type"] == "text" and row["inside"]:
                lines.append(row["inside"])
            if sum(len(x) + 1 for x in lines) >= n_chars:
                break
    return "\n".join(lines)[:n_chars]


def make_batches(rows: int, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(tokens, density) [rows, SEQ_LEN + 1] per step: consecutive windows of one text, like packed data."""
    n_chars = rows * steps * (SEQ_LEN + 1)
    text = report_text(n_chars)
    assert len(text) == n_chars, "the annual report is shorter than the test needs"
    density = torch.as_tensor(DensityAnalyzer().analyze(text).density, dtype=torch.float32)
    tokens = torch.tensor([ord(char) % VOCAB for char in text])
    tokens, density = tokens.view(steps, rows, SEQ_LEN + 1), density.view(steps, rows, SEQ_LEN + 1)
    return [(tokens[step], density[step]) for step in range(steps)]


def plans_of(density: torch.Tensor) -> set[tuple]:
    plans = [plan_blocks(row[:-1], PLAN) for row in density]
    return {(tuple(p.dense.tolist()), tuple(p.window.tolist())) for p in plans}


@pytest.fixture(scope="module")
def batches_of_4():
    return make_batches(rows=4, steps=2)


def test_batches_have_varied_sparse_plans(batches_of_4):
    for _, density in batches_of_4:
        plans = plans_of(density)
        assert len(plans) > 1, "every sequence of the batch got the same plan"
        # A window shorter than the sequence means the mask is not dense attention.
        assert any(min(window) < SEQ_LEN for _, window in plans)


def test_small_clip_is_below_reference_norm(batches_of_4):
    torch.manual_seed(0)
    model = Transformer(density_config())
    batch, density = batches_of_4[0]
    reference_loss(model, batch, density).backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf")).item()
    assert norm > 10 * SMALL_CLIP


def test_config_rejects_invalid_grad_clip():
    with pytest.raises(ValueError, match="grad_clip=-1.0 is invalid"):
        EngineConfig(grad_clip=-1.0)
    with pytest.raises(ValueError, match="grad_clip=inf is invalid"):
        EngineConfig(grad_clip=float("inf"))


def two_way_density(batches) -> None:
    cfg = density_config()
    common = dict(seq_len=SEQ_LEN, grad_clip=SMALL_CLIP)
    check_layout(cfg, EngineConfig(dp=2, microbatches=2, **common), batches=batches)
    check_layout(cfg, EngineConfig(dp=2, microbatches=2, **common), batches=batches, split=[3, 1])
    check_layout(cfg, EngineConfig(tp=2, microbatches=4, **common), batches=batches)
    check_layout(cfg, EngineConfig(pp=2, microbatches=4, schedule="1f1b", **common), batches=batches)
    check_layout(cfg, EngineConfig(pp=2, microbatches=4, schedule="interleaved", **common), batches=batches)
    # Clipping off: the norm is still reported, and the update is the unclipped one.
    engine = check_layout(cfg, EngineConfig(pp=2, microbatches=4, seq_len=SEQ_LEN, grad_clip=0.0),
                          batches=batches)

    batch, density = batches[0]
    with pytest.raises(ValueError, match="needs token densities"):
        engine.forward_backward(batch)
    with pytest.raises(ValueError, match="pass one density per token"):
        engine.forward_backward(batch, density[:, :-1])


def test_two_way_density_layouts_match_single_process(batches_of_4):
    run_world(2, two_way_density, batches_of_4)


def eight_way_density(batches) -> None:
    check_layout(density_config(), EngineConfig(dp=2, tp=2, pp=2, microbatches=4, seq_len=SEQ_LEN,
                                                grad_clip=SMALL_CLIP), batches=batches)


@pytest.mark.slow
def test_dp2_tp2_pp2_density_matches_single_process():
    run_world(8, eight_way_density, make_batches(rows=8, steps=2))
