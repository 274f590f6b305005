"""The FlexAttention backend: torch.nn.attention.flex_attention under a BlockMask built from the plan.

The BlockMask comes straight from the plan's block lists. A block whose every
(query, key) pair is allowed is a "full" block, which skips the mask function.
In the other listed blocks the plan's token rule (BlockPlan.mask_mod) decides.
Nothing evaluates the mask over the T x T grid.

On CUDA this backend trains and serves. On CPU, FlexAttention (torch 2.13)
compiles a forward kernel only, so it serves inference and raises when
gradients are needed.

NOTE: only the CPU path has been run. On CUDA the plan's block size becomes
the BlockMask block size, and blocks smaller than FlexAttention's default of
128 tokens may not suit its Triton kernel tiles.

Legend: B batch, H query heads, G key/value heads, T tokens, D head dim,
N kernel blocks (the plan's blocks, also the BlockMask's blocks).
"""

from __future__ import annotations

import math

import torch
from torch.nn.attention.flex_attention import BlockMask
from torch.nn.attention.flex_attention import flex_attention as _flex_attention

from densa.attention.blocksparse import check_attention_inputs
from densa.density.plan import BlockPlan

# One compiled function serves every call, so torch.compile reuses its kernels
# across plans of the same shape, mask variant and head grouping.
_compiled_flex = None


def _compiled():
    global _compiled_flex
    if _compiled_flex is None:
        _compiled_flex = torch.compile(_flex_attention)
    return _compiled_flex


def _full_blocks(plan: BlockPlan, causal: bool, needed: torch.Tensor) -> torch.Tensor:
    """Bool [N, N]: needed blocks where every query of the row block may see every key of the column block."""
    n, bs = plan.n_blocks, plan.block_size
    rows = torch.arange(n)[:, None]
    cols = torch.arange(n)[None, :]

    # Window blocks are full when the farthest query-key pair is inside the window.
    farthest = ((rows - cols).abs() + 1) * bs - 1
    within_window = farthest < plan.window[:, None]
    full = plan.dense[:, None] | plan.dense[None, :] | within_window
    if causal:
        full &= cols < rows
    if plan.seq_len % bs:
        # The last key block holds padding past seq_len, which only the mask function drops.
        full[:, -1] = False
    return needed & full


def _compact(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool [N, N] -> (counts [1, 1, N], indices [1, 1, N, N]) int32, chosen blocks first in ascending order."""
    n = blocks.shape[0]
    counts = blocks.sum(dim=1)
    order = torch.argsort((~blocks).to(torch.int64) * n + torch.arange(n)[None, :], dim=1)
    # from_kv_blocks infers the number of key blocks from the last dimension, so rows stay N wide.
    return counts.to(torch.int32)[None, None], order.to(torch.int32)[None, None]


def build_block_mask(plan: BlockPlan, causal: bool = True, device: torch.device | str = "cpu") -> BlockMask:
    """Build the plan's BlockMask from its key-block lists; cached on the plan per (causal, device)."""
    device = torch.device(device)
    key = ("flex_block_mask", causal, str(device))
    if key in plan._cache:
        return plan._cache[key]

    n, bs, seq_len = plan.n_blocks, plan.block_size, plan.seq_len
    counts, indices = plan.key_blocks(causal)
    needed = torch.zeros(n, n, dtype=torch.bool)
    rows = torch.arange(n)[:, None].expand_as(indices)
    listed = indices >= 0
    needed[rows[listed], indices[listed]] = True

    full = _full_blocks(plan, causal, needed)
    partial = needed & ~full
    kv_num_blocks, kv_indices = _compact(partial)
    full_kv_num_blocks, full_kv_indices = _compact(full)

    # FlexAttention may call the mask function on the padding rows and columns
    # of the last block, so the rule is evaluated on a plan padded to N blocks,
    # and keys past seq_len are masked out.
    padded_rule = BlockPlan(n * bs, bs, plan.dense, plan.window).mask_mod(causal, device)

    def mask_mod(b, h, q_idx, kv_idx):
        return padded_rule(b, h, q_idx, kv_idx) & (kv_idx < seq_len)

    block_mask = BlockMask.from_kv_blocks(
        kv_num_blocks.to(device),
        kv_indices.to(device),
        full_kv_num_blocks.to(device),
        full_kv_indices.to(device),
        BLOCK_SIZE=bs,
        mask_mod=mask_mod,
        seq_lengths=(seq_len, seq_len),
    )
    plan._cache[key] = block_mask
    return block_mask


def flex_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: BlockPlan, causal: bool = True
) -> torch.Tensor:
    """Attention of q [B, H, T, D] over k, v [B, G, T, D] under the plan's mask, with compiled FlexAttention.

    Differentiable on CUDA. On CPU it raises when any input requires grad,
    because FlexAttention has no CPU backward pass. Use the blocksparse backend there.
    """
    check_attention_inputs(q, k, v, plan)
    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    if q.device.type == "cpu" and needs_grad:
        raise RuntimeError(
            "FlexAttention has no backward pass on CPU. Use backend='blocksparse' to train on CPU, "
            "or call flex under torch.no_grad() for inference"
        )
    if q.device.type == "cpu":
        # Under no_grad, CPU flex still rejects inputs that require grad.
        q, k, v = q.detach(), k.detach(), v.detach()
    block_mask = build_block_mask(plan, causal, q.device)
    return _compiled()(
        q,
        k,
        v,
        block_mask=block_mask,
        scale=1.0 / math.sqrt(q.shape[-1]),
        enable_gqa=k.shape[1] != q.shape[1],
    )
