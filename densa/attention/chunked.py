"""Chunked prefill: attention of a chunk of prompt queries over the keys its plan allows.

A long prompt is fed to the model a chunk of queries at a time (for example
2048), so no step ever stores a T x T score or mask matrix. Within a chunk at
positions [start, end) the queries split by the plan's rule (see
densa.density.plan):

* Low-density queries attend to the high-density keys and to their window.
  The density-aware cache holds exactly those keys from earlier chunks (its
  dense slots and ring buffer), and the chunk adds its own. One fused
  attention call covers all low-density rows of the chunk, with a token-exact
  mask over at most (high-density tokens + ring + chunk) keys.
* High-density queries attend to every earlier key. They read a staging copy
  of the prompt prefix up to the end of their own block, one query block at
  a time, so the mask is [block_size, T] at most.

Memory is linear in T: the staging copy of keys and values, and one
[block_size, T] mask for a high-density block. The result equals attention over
the whole prompt under the same plan, up to float summation order.

Legend: H query heads, G key/value heads, C chunk queries, S keys of one call,
T prompt tokens, D head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from densa.density.plan import BlockPlan


def chunk_bounds(seq_len: int, chunk: int) -> list[tuple[int, int]]:
    """Return the (start, end) token ranges of a prompt of `seq_len` tokens in chunks of `chunk`."""
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"prefill chunk={chunk!r} is invalid; use a positive number of tokens such as 2048")
    return [(start, min(start + chunk, seq_len)) for start in range(0, seq_len, chunk)]


def allowed_keys(plan: BlockPlan, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """Bool [len(q_pos), len(k_pos)]: the plan's causal rule on arbitrary prompt positions.

    Key positions of -1 mark empty cache slots and are never allowed.
    """
    valid = k_pos >= 0
    rule = plan.mask_mod(causal=True, device=q_pos.device)
    return rule(None, None, q_pos[:, None], k_pos.clamp(min=0)[None, :]) & valid[None, :]


def _dense_block_prefix(plan: BlockPlan, block: int) -> int:
    """Tokens of the key prefix that high-density query block `block` reads: every key up to its end.

    Taken from the rule itself: a high-density query attends to every earlier key.
    """
    return min((block + 1) * plan.block_size, plan.seq_len)


def chunk_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    start: int,
    plan: BlockPlan,
    cached_k: torch.Tensor,
    cached_v: torch.Tensor,
    cached_pos: torch.Tensor,
    stage_k: torch.Tensor | None,
    stage_v: torch.Tensor | None,
) -> torch.Tensor:
    """Attention of one sequence's chunk q [1, H, C, D] at positions [start, start + C) -> [1, H, C, D].

    `k`, `v` [1, G, C, D] are the chunk's own keys and values. `cached_k`,
    `cached_v` [1, G, S, D] with positions `cached_pos` [S] (-1 for empty slots)
    contain the high-density keys up to the chunk's end and the low-density
    keys that earlier chunks left in the ring buffer. The chunk's own
    high-density keys must already be stored there. `stage_k`, `stage_v` [1, G, T_stage, D] hold
    every key up to the end of the last high-density block, the chunk's
    included; they may be None when the chunk holds no high-density query.
    """
    C = q.shape[2]
    device = q.device
    q_pos = torch.arange(start, start + C, device=device)
    q_dense = plan.token_dense()[start : start + C].to(device)
    out = torch.empty_like(q)

    # Low-density rows: cached keys plus the chunk's own low-density keys (its
    # high-density keys are in the cache already, and must not count twice).
    low = (~q_dense).nonzero().flatten()
    if low.numel():
        keys = torch.cat([cached_k, k[:, :, low]], dim=2)  # [1, G, S + C_low, D]
        values = torch.cat([cached_v, v[:, :, low]], dim=2)
        k_pos = torch.cat([cached_pos, q_pos[low]])
        mask = allowed_keys(plan, q_pos[low], k_pos)  # [C_low, S + C_low]
        rows = F.scaled_dot_product_attention(
            q[:, :, low], keys, values, attn_mask=mask[None, None], enable_gqa=True
        )
        out[:, :, low] = rows

    # High-density rows, one query block at a time: all of each block's key prefix.
    dense_rows = q_dense.nonzero().flatten()
    if dense_rows.numel():
        if stage_k is None or stage_v is None:
            raise ValueError("a chunk with high-density queries needs the staged prompt keys; none were given")
        bs = plan.block_size
        blocks = torch.div(q_pos[dense_rows], bs, rounding_mode="floor")
        for block in blocks.unique().tolist():
            rows = dense_rows[blocks == block]
            prefix = _dense_block_prefix(plan, block)
            if prefix > stage_k.shape[2]:
                raise ValueError(
                    f"query block {block} reads {prefix} staged keys but only {stage_k.shape[2]} are staged"
                )
            k_pos = torch.arange(prefix, device=device)
            mask = k_pos[None, :] <= q_pos[rows][:, None]  # [rows, prefix]
            out[:, :, rows] = F.scaled_dot_product_attention(
                q[:, :, rows],
                stage_k[:, :, :prefix],
                stage_v[:, :, :prefix],
                attn_mask=mask[None, None],
                enable_gqa=True,
            )
    return out
