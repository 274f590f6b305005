"""Sparse attention backends against the dense reference, forward and gradients.

Lengths are deliberately not multiples of the block size, windows are not
block-aligned, and key/value heads are grouped (H=4 with G=2 or G=1).
"""

import math

import pytest
import torch

import densa.attention.blocksparse as blocksparse_module
from densa.attention import (
    BACKENDS,
    blocksparse_attention,
    build_block_mask,
    choose_backend,
    dense_mask,
    density_attention,
    flex_attention,
    reference_attention,
)
from densa.density.plan import BlockPlan, PlanConfig, plan_blocks

# fp32 tolerances: the backends sum the same terms in a different order.
ATOL = 1e-5
RTOL = 1e-5
HEAD_DIM = 16


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _plan(seq_len: int, block_size: int, dense: list[int], window: list[int]) -> BlockPlan:
    return BlockPlan(seq_len, block_size, torch.tensor(dense, dtype=torch.bool), torch.tensor(window))


def _density_plan(seq_len: int, level: float) -> BlockPlan:
    """A plan from plan_blocks on a wavy density profile; `level` shifts how much of it is dense."""
    position = torch.arange(seq_len, dtype=torch.float32)
    density = (0.5 + 0.5 * torch.sin(position / 23.0) * torch.cos(position / 61.0) + level).clamp(0, 1)
    config = PlanConfig(
        threshold=0.7,
        block_size=16,
        near_window=(9, 40),
        far_window=(3, 13),
        near_tokens=32,
        far_tokens=96,
        max_dense_fraction=0.6,
    )
    return plan_blocks(density, config)


# Name -> plan. Every sequence length leaves a partial last block.
PLANS = {
    # dense blocks at the start, middle and end; windows of 5 to 40 tokens in 32-token blocks
    "dense_start_middle_end": _plan(200, 32, [1, 0, 0, 1, 0, 0, 1], [0, 5, 20, 0, 40, 33, 0]),
    # windows on both sides of the block edges (31/32 and 63/64 tokens)
    "dense_middle": _plan(200, 32, [0, 0, 1, 1, 0, 0, 0], [1, 64, 0, 0, 63, 31, 32]),
    "sliding": BlockPlan.sliding(150, 20, block_size=16),
    "full": BlockPlan.full(150, block_size=16),
    "density_low": _density_plan(230, -0.15),
    "density_mid": _density_plan(230, 0.0),
    "density_high": _density_plan(230, 0.2),
    "block_128": _plan(300, 128, [0, 1, 0], [200, 0, 37]),
}


def _inputs(seq_len: int, heads: int = 4, kv_heads: int = 2, batch: int = 2, requires_grad: bool = True):
    q = torch.randn(batch, heads, seq_len, HEAD_DIM, requires_grad=requires_grad)
    k = torch.randn(batch, kv_heads, seq_len, HEAD_DIM, requires_grad=requires_grad)
    v = torch.randn(batch, kv_heads, seq_len, HEAD_DIM, requires_grad=requires_grad)
    return q, k, v


def _assert_matches_reference(backend, plan: BlockPlan, causal: bool, kv_heads: int) -> None:
    q, k, v = _inputs(plan.seq_len, kv_heads=kv_heads)
    expected = reference_attention(q, k, v, plan, causal)
    actual = backend(q, k, v, plan, causal)
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL)

    grad_out = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, (q, k, v), grad_out)
    actual_grads = torch.autograd.grad(actual, (q, k, v), grad_out)
    for name, got, want in zip("qkv", actual_grads, expected_grads):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL, msg=lambda m: f"grad of {name}: {m}")


def test_plans_cover_the_hard_cases():
    # The density plans must really mix dense and windowed blocks, or the tests above prove less.
    for name in ("density_low", "density_mid", "density_high"):
        plan = PLANS[name]
        assert 0 < int(plan.dense.sum()) < plan.n_blocks, name
    assert PLANS["density_low"].dense_fraction() < PLANS["density_high"].dense_fraction()
    for plan in PLANS.values():
        assert plan.seq_len % plan.block_size != 0


@pytest.mark.parametrize("kv_heads", [2, 1])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("plan_name", list(PLANS))
def test_blocksparse_matches_reference(plan_name, causal, kv_heads):
    _assert_matches_reference(blocksparse_attention, PLANS[plan_name], causal, kv_heads)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("plan_name", ["dense_start_middle_end", "density_mid", "sliding"])
def test_blocksparse_matmul_path_matches_reference(monkeypatch, plan_name, causal):
    # Devices without PyTorch's CPU flash kernel run the matmul path; check it on CPU.
    monkeypatch.setattr(blocksparse_module, "_use_fused_kernel", lambda q: False)
    _assert_matches_reference(blocksparse_attention, PLANS[plan_name], causal, kv_heads=2)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_blocksparse_chunked_windows_match_reference(monkeypatch, causal):
    # Long sequences split window parts into chunks; force two blocks per chunk.
    monkeypatch.setattr(blocksparse_module, "WINDOW_CHUNK_TOKENS", 32)
    source = PLANS["density_low"]
    # A fresh plan, because layouts are cached on the plan.
    plan = BlockPlan(source.seq_len, source.block_size, source.dense.clone(), source.window.clone())
    _assert_matches_reference(blocksparse_attention, plan, causal, kv_heads=2)
    window_parts = [part for part in blocksparse_module.prepare_layout(plan, causal).parts if part.mask_id is not None]
    assert max(part.q_rows.start.numel() for part in window_parts) == 2


def test_blocksparse_accepts_transposed_inputs():
    # Models often produce q, k, v as [B, T, H, D] and transpose them.
    plan = PLANS["dense_start_middle_end"]
    q, k, v = (x.transpose(1, 2) for x in (torch.randn(1, plan.seq_len, h, HEAD_DIM) for h in (4, 2, 2)))
    expected = reference_attention(q, k, v, plan, True)
    torch.testing.assert_close(blocksparse_attention(q, k, v, plan, True), expected, atol=ATOL, rtol=RTOL)


def test_blocksparse_rejects_mismatched_inputs():
    plan = PLANS["sliding"]
    q, k, v = _inputs(plan.seq_len + 1, requires_grad=False)
    with pytest.raises(ValueError, match="plan covers 150 tokens but q has 151"):
        blocksparse_attention(q, k, v, plan)
    q, k, v = _inputs(plan.seq_len, heads=4, kv_heads=3, requires_grad=False)
    with pytest.raises(ValueError, match="4 query heads cannot share 3 key/value heads"):
        blocksparse_attention(q, k, v, plan)


# FlexAttention compiles one kernel per shape, mask variant and head grouping,
# which takes seconds on CPU, so every flex test shares one shape.
FLEX_PLANS = ["dense_start_middle_end", "dense_middle", "density_flex", "sliding_flex", "full_flex"]
FLEX_LEN, FLEX_BLOCK = 200, 32
PLANS["density_flex"] = plan_blocks(
    (torch.arange(FLEX_LEN) % 90 < 40).float(), PlanConfig(block_size=FLEX_BLOCK, near_window=(9, 40), far_window=(3, 13))
)
PLANS["sliding_flex"] = BlockPlan.sliding(FLEX_LEN, 45, block_size=FLEX_BLOCK)
PLANS["full_flex"] = BlockPlan.full(FLEX_LEN, block_size=FLEX_BLOCK)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("plan_name", FLEX_PLANS)
def test_flex_matches_reference(plan_name, causal):
    plan = PLANS[plan_name]
    q, k, v = _inputs(plan.seq_len, batch=1, requires_grad=False)
    with torch.no_grad():
        actual = flex_attention(q, k, v, plan, causal)
    torch.testing.assert_close(actual, reference_attention(q, k, v, plan, causal), atol=ATOL, rtol=RTOL)


def test_flex_matches_reference_one_kv_head():
    plan = PLANS["dense_start_middle_end"]
    q, k, v = _inputs(plan.seq_len, kv_heads=1, batch=1, requires_grad=False)
    with torch.no_grad():
        actual = flex_attention(q, k, v, plan, True)
    torch.testing.assert_close(actual, reference_attention(q, k, v, plan, True), atol=ATOL, rtol=RTOL)


def test_flex_rejects_grad_on_cpu():
    plan = PLANS["sliding_flex"]
    q, k, v = _inputs(plan.seq_len, batch=1)
    with pytest.raises(RuntimeError, match="no backward pass on CPU"):
        flex_attention(q, k, v, plan)

    # Trainable tensors are fine for inference under no_grad.
    with torch.no_grad():
        actual = flex_attention(q, k, v, plan)
    torch.testing.assert_close(actual, reference_attention(q, k, v, plan), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize(
    "plan_name", ["dense_start_middle_end", "dense_middle", "density_mid", "sliding", "block_128"]
)
def test_block_mask_lists_plan_blocks(plan_name, causal):
    plan = PLANS[plan_name]
    block_mask = build_block_mask(plan, causal)
    n, bs = plan.n_blocks, plan.block_size

    def listed(num_blocks, indices):
        blocks = torch.zeros(n, n, dtype=torch.bool)
        for row in range(n):
            blocks[row, indices[0, 0, row, : num_blocks[0, 0, row]].long()] = True
        return blocks

    partial = listed(block_mask.kv_num_blocks, block_mask.kv_indices)
    full = listed(block_mask.full_kv_num_blocks, block_mask.full_kv_indices)
    assert not (partial & full).any()

    counts, indices = plan.key_blocks(causal)
    for row in range(n):
        expected = indices[row, : counts[row]].tolist()
        assert (partial[row] | full[row]).nonzero().flatten().tolist() == expected

    # A full block must allow every real (query, key) pair in it, since flex skips its mask.
    padded_len = n * bs
    allowed = torch.zeros(padded_len, padded_len, dtype=torch.bool)
    allowed[: plan.seq_len, : plan.seq_len] = dense_mask(plan, causal)
    real = torch.zeros(padded_len, dtype=torch.bool)
    real[: plan.seq_len] = True
    per_block = (allowed | ~real[:, None] | ~real[None, :]).view(n, bs, n, bs).all(3).all(1)
    assert per_block[full].all()
    # Away from the partial last block, every fully allowed block is listed as full.
    inner = slice(0, n - 1)
    assert torch.equal(full[inner, inner], (per_block & (partial | full))[inner, inner])


def test_flex_block_mask_is_cached():
    plan = PLANS["dense_middle"]
    assert build_block_mask(plan, True) is build_block_mask(plan, True)
    assert build_block_mask(plan, True) is not build_block_mask(plan, False)


def test_density_attention_forced_backends():
    plan = PLANS["dense_start_middle_end"]
    q, k, v = _inputs(plan.seq_len, batch=1, requires_grad=False)
    expected = reference_attention(q, k, v, plan, True)
    with torch.no_grad():
        for backend in ("reference", "blocksparse", "flex"):
            actual = density_attention(q, k, v, plan, causal=True, backend=backend)
            torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL, msg=lambda m: f"{backend}: {m}")


def test_density_attention_auto_on_cpu():
    plan = PLANS["density_mid"]
    q, k, v = _inputs(plan.seq_len)
    assert choose_backend(q) == "blocksparse"
    with torch.no_grad():
        assert choose_backend(q) == "blocksparse"
        inference = density_attention(q, k, v, plan)
    torch.testing.assert_close(inference, reference_attention(q, k, v, plan), atol=ATOL, rtol=RTOL)

    # With grad needed, auto must pick a backend with a CPU backward pass.
    out = density_attention(q, k, v, plan)
    out.sum().backward()
    for name, tensor in zip("qkv", (q, k, v)):
        assert tensor.grad is not None and torch.isfinite(tensor.grad).all(), name


def test_density_attention_rejects_unknown_backend():
    plan = PLANS["sliding"]
    q, k, v = _inputs(plan.seq_len, requires_grad=False)
    with pytest.raises(ValueError, match="'triton'.*auto, reference, blocksparse, flex"):
        density_attention(q, k, v, plan, backend="triton")
    assert BACKENDS == ("auto", "reference", "blocksparse", "flex")


def test_blocksparse_hand_computed_case():
    # One query block of 16 tokens seeing a window of 1: every token attends to itself only, so out == v.
    plan = BlockPlan.sliding(16, 1, block_size=16)
    q, k, v = _inputs(16, heads=2, kv_heads=1, batch=1, requires_grad=False)
    out = blocksparse_attention(q, k, v, plan, causal=False)
    torch.testing.assert_close(out, v.expand(1, 2, 16, HEAD_DIM), atol=ATOL, rtol=RTOL)
    assert math.isclose(plan.block_sparsity(False), 0.0)


def test_blocksparse_bfloat16_close_to_reference():
    plan = PLANS["dense_start_middle_end"]
    q, k, v = _inputs(plan.seq_len, requires_grad=False)
    expected = reference_attention(q, k, v, plan, True)
    actual = blocksparse_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), plan, True)
    assert actual.dtype == torch.bfloat16
    # bfloat16 keeps 8 bits of mantissa; inputs alone are rounded by up to 2**-9 relative.
    torch.testing.assert_close(actual.float(), expected, atol=2e-2, rtol=2e-2)
