"""The reference backend: dense attention under the plan's mask, evaluated token by token.

This is the ground truth in tests. It builds the full T x T mask, so it needs
O(T^2) memory; use it only at test lengths.

Legend: B batch, H query heads, G key/value heads (H % G == 0), T tokens, D head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from densa.density.plan import BlockPlan


def dense_mask(plan: BlockPlan, causal: bool = True, device: torch.device | str = "cpu") -> torch.Tensor:
    """Bool tensor [T, T]: entry (q, k) is true when query q may attend to key k."""
    idx = torch.arange(plan.seq_len, device=device)
    return plan.mask_mod(causal, device)(None, None, idx[:, None], idx[None, :])


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: BlockPlan, causal: bool = True
) -> torch.Tensor:
    """Attention of q [B, H, T, D] over k, v [B, G, T, D] under the plan's mask -> [B, H, T, D]."""
    mask = dense_mask(plan, causal, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1])
