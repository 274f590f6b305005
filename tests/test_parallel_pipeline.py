"""Pipeline helpers without processes: stage cuts, stage modules and the bubble replay."""

import pytest
import torch

from densa.model.config import ModelConfig
from densa.model.llama import Transformer
from densa.train.parallel.pipeline import (
    build_stage_module,
    costs_by_params,
    costs_by_time,
    partition,
    schedule_bubble,
    stage_ids_for_rank,
    valid_microbatches,
)


def tiny_model(n_layers: int = 4) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=64, dim=32, n_layers=n_layers, n_heads=4, n_kv_heads=2, ffn_dim=64,
                                   max_seq_len=32, attention="dense"))


def one_f_one_b(p: int, m: int) -> dict:
    """Per-rank 1F1B order written out by hand: p - 1 - r warm-up forwards, then alternate, then drain."""
    orders = {}
    for r in range(p):
        warmup = min(p - 1 - r, m)
        actions = [("F", r, i) for i in range(warmup)]
        f, b = warmup, 0
        while f < m:
            actions += [("F", r, f), ("B", r, b)]
            f, b = f + 1, b + 1
        actions += [("B", r, i) for i in range(b, m)]
        orders[r] = actions
    return orders


@pytest.mark.parametrize("p, m", [(2, 4), (4, 8), (4, 58), (8, 134)])
def test_bubble_replay_matches_1f1b_formula(p, m):
    assert schedule_bubble(one_f_one_b(p, m)) == pytest.approx((p - 1) / (m + p - 1))


def test_bubble_replay_gpipe_order():
    # All forwards, then all backwards: the same idle share as 1F1B, (p - 1)/(m + p - 1).
    orders = {r: [("F", r, i) for i in range(4)] + [("B", r, i) for i in range(4)] for r in range(2)}
    assert schedule_bubble(orders) == pytest.approx(1 / 5)


def test_bubble_replay_detects_deadlock():
    orders = {0: [("B", 0, 0), ("F", 0, 0)], 1: [("F", 1, 0), ("B", 1, 0)]}
    with pytest.raises(RuntimeError, match="deadlocks"):
        schedule_bubble(orders)


def test_partition_even_and_weighted():
    assert partition([1.0] * 8, 4) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    # A heavy output head (cost 3) on the last stage leaves it one layer; the costliest stage costs 4.
    weighted = partition([1.0] * 8, 4, last_extra=3.0)
    assert weighted[-1] == [7]
    assert sum(weighted, []) == list(range(8))
    assert max(len(stage) for stage in weighted[:-1]) == 3
    assert partition([1, 1, 1, 5], 2) == [[0, 1, 2], [3]]
    with pytest.raises(ValueError, match="non-empty"):
        partition([1.0] * 3, 4)


def test_stage_ids_loop_placement():
    assert stage_ids_for_rank(1, 4, 1) == [1]
    assert stage_ids_for_rank(1, 4, 2) == [1, 5]


def test_interleaved_microbatch_counts():
    assert valid_microbatches(10, 4, "interleaved")
    assert not valid_microbatches(9, 4, "interleaved")
    assert valid_microbatches(9, 4, "1f1b")


def test_stage_modules_chain_to_full_model():
    model = tiny_model()
    tokens = torch.randint(0, 64, (2, 8))
    first = build_stage_module(model, [0, 1], first=True, last=False)
    last = build_stage_module(model, [2, 3], first=False, last=True)
    assert first.output is None
    assert last.tok_embeddings is None
    assert list(first.layers.keys()) == ["0", "1"]
    assert list(last.layers.keys()) == ["2", "3"]
    assert "layers.2.attention.wq.weight" in dict(last.named_parameters())
    torch.testing.assert_close(last(first(tokens)), model(tokens))


def test_stage_costs_by_params_and_time():
    model = tiny_model()
    layers, first, last = costs_by_params(model)
    assert len(layers) == 4
    assert len(set(layers)) == 1
    assert first == 64 * 32
    assert last == 32 + 64 * 32
    timed, first_s, last_s = costs_by_time(model, torch.randint(0, 64, (1, 16)), repeats=1)
    assert len(timed) == 4
    assert all(t > 0 for t in timed)
    assert first_s > 0
    assert last_s > 0
    assert all(p.grad is None for p in model.parameters())
