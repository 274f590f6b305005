"""Block plans: mask semantics, key-block lists, sparsity and window adaptation, on hand-built cases."""

from __future__ import annotations

import pytest
import torch

from densa.attention.reference import dense_mask
from densa.density.plan import BlockPlan, PlanConfig, generated_window, plan_blocks

SMALL = PlanConfig(block_size=16, near_window=(8, 16), far_window=(4, 8), near_tokens=16, far_tokens=48,
                   max_dense_fraction=0.2)


def brute_force_mask(plan: BlockPlan, causal: bool) -> torch.Tensor:
    """The documented rule, evaluated with Python loops."""
    dense, window = plan.token_dense().tolist(), plan.token_window().tolist()
    T = plan.seq_len
    mask = torch.zeros(T, T, dtype=torch.bool)
    for q in range(T):
        for k in range(T):
            if causal and k > q:
                continue
            mask[q, k] = dense[q] or dense[k] or abs(q - k) < window[q]
    return mask


def varied_density(T: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    density = torch.rand(T, generator=generator) * 0.5
    density[20:40] = 0.95  # one dense stretch
    return density


@pytest.mark.parametrize("causal", [True, False])
def test_mask_matches_rule(causal):
    plan = plan_blocks(varied_density(90), SMALL)
    assert plan.dense.any()
    assert not plan.dense.all()
    assert torch.equal(dense_mask(plan, causal), brute_force_mask(plan, causal))


@pytest.mark.parametrize("causal", [True, False])
def test_key_blocks_cover_mask_exactly(causal):
    plan = plan_blocks(varied_density(150, seed=1), SMALL)
    mask = dense_mask(plan, causal)
    n, bs = plan.n_blocks, plan.block_size
    counts, indices = plan.key_blocks(causal)
    for qb in range(n):
        rows = mask[qb * bs : (qb + 1) * bs]
        needed = [kb for kb in range(n) if rows[:, kb * bs : (kb + 1) * bs].any()]
        assert indices[qb, : counts[qb]].tolist() == needed, qb
        assert (indices[qb, counts[qb] :] == -1).all()


def test_sparsity_hand_computed():
    # 4 blocks of 16, no dense block, window 8: each query block needs itself
    # and the previous block (except the first): 1 + 2 + 2 + 2 = 7 of 10.
    plan = BlockPlan.sliding(64, 8, block_size=16)
    assert plan.computed_blocks(causal=True) == 7
    assert plan.total_blocks(causal=True) == 10
    assert plan.block_sparsity(causal=True) == pytest.approx(0.3)
    assert plan.ideal_speedup(causal=True) == pytest.approx(10 / 7)
    assert BlockPlan.full(64, 16).block_sparsity() == 0.0


def test_windows_widen_near_dense_blocks():
    density = torch.zeros(160)
    density[0:16] = 0.9  # block 0 dense
    plan = plan_blocks(density, SMALL)
    assert plan.dense.tolist() == [True] + [False] * 9
    windows = plan.window[1:].tolist()
    # Distance 0, 16, 32, ... tokens from the dense block: near range, then far.
    assert windows[0] == 16
    assert windows[1] == 8
    assert all(4 <= w <= 8 for w in windows[2:])
    assert windows == sorted(windows, reverse=True)


def test_no_dense_block_gives_far_minimum():
    plan = plan_blocks(torch.full((64,), 0.3), SMALL)
    assert not plan.dense.any()
    assert plan.window.tolist() == [4] * 4


def test_dense_budget_caps_dense_blocks():
    density = torch.full((16 * 20,), 0.9)
    config = PlanConfig(block_size=16, max_dense_fraction=0.1)
    plan = plan_blocks(density, config)
    assert int(plan.dense.sum()) == 2  # ceil(0.1 * 20)


def test_generated_window_follows_distance():
    density = torch.zeros(64)
    density[:16] = 0.9
    plan = plan_blocks(density, SMALL)
    assert generated_window(plan, 64, SMALL) == 4  # block 4: 48 tokens past the dense block
    assert generated_window(plan, 20, SMALL) == 16  # adjacent block


@pytest.mark.parametrize(
    "changes, fragment",
    [
        ({"threshold": 0.0}, "threshold=0.0"),
        ({"threshold": 1.5}, "threshold=1.5"),
        ({"block_size": 48}, "block_size=48"),
        ({"near_window": (64, 32)}, "near_window=(64, 32)"),
        ({"far_window": (0, 8)}, "far_window=(0, 8)"),
        ({"near_tokens": 512, "far_tokens": 256}, "near_tokens=512"),
        ({"max_dense_fraction": 2.0}, "max_dense_fraction=2.0"),
    ],
)
def test_invalid_plan_config_rejected(changes, fragment):
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        PlanConfig(**changes)


def test_invalid_densities_rejected():
    with pytest.raises(ValueError, match="empty"):
        plan_blocks(torch.zeros(0))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        plan_blocks(torch.tensor([0.5, 1.5]))
    with pytest.raises(ValueError, match="blocks"):
        BlockPlan(100, 16, torch.zeros(3, dtype=torch.bool), torch.ones(3, dtype=torch.long))


def test_key_blocks_ordered_past_127_blocks():
    # 130 blocks: block ids past 127 must not wrap when rows are sorted.
    plan = plan_blocks(varied_density(16 * 130, seed=2), SMALL)
    counts, indices = plan.key_blocks(causal=True)
    mask = dense_mask(plan, causal=True)
    bs = plan.block_size
    for qb in (0, 64, 127, 128, 129):
        rows = mask[qb * bs : (qb + 1) * bs]
        needed = [kb for kb in range(plan.n_blocks) if rows[:, kb * bs : (kb + 1) * bs].any()]
        assert indices[qb, : counts[qb]].tolist() == needed, qb


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("seed", range(6))
def test_key_blocks_match_token_mask_on_random_plans(causal, seed):
    # Several dense stretches, windows wider and narrower than a block, and a
    # ragged last block: the direct construction must equal the token mask.
    generator = torch.Generator().manual_seed(seed)
    T = int(torch.randint(200, 700, (1,), generator=generator))
    config = PlanConfig(block_size=16, near_window=(3, 40), far_window=(1, 9), near_tokens=20, far_tokens=80,
                        max_dense_fraction=0.3, threshold=0.6)
    plan = plan_blocks(torch.rand(T, generator=generator), config)
    assert 1 < int(plan.dense.sum()) < plan.n_blocks
    n, bs = plan.n_blocks, plan.block_size
    mask = torch.nn.functional.pad(dense_mask(plan, causal), (0, n * bs - T, 0, n * bs - T))
    needed = mask.view(n, bs, n, bs).any(dim=3).any(dim=1)  # [N, N] block-level
    counts, indices = plan.key_blocks(causal)
    assert torch.equal(counts, needed.sum(dim=1))
    assert plan.computed_blocks(causal) == int(needed.sum())
    for qb in range(n):
        assert indices[qb, : counts[qb]].tolist() == needed[qb].nonzero().flatten().tolist(), qb
        assert (indices[qb, counts[qb] :] == -1).all()
