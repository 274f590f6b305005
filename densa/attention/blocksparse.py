"""Block-sparse attention in plain PyTorch: computes only what a BlockPlan allows.

This is the CPU training path, because FlexAttention has no backward pass on
CPU. The plan's attention splits into a few dense sub-problems ("parts"). Each
part goes to PyTorch's fused attention kernel, which returns the output and
the row logsumexp without materialising scores:

* A dense query stretch (a run of high-density blocks) attends to every key
  visible to it. When causal, that is its key prefix without a mask plus its
  own keys with the causal mask. When bidirectional, it is the whole sequence.
* A run of low-density query blocks attends, without a mask, to the visible
  keys of high-density blocks. These keys are gathered once into one buffer,
  and every run uses a prefix of it.
* Every low-density query block attends to the key range its window reaches.
  These ranges are gathered per block and batched by reach. A token-exact
  additive mask drops keys outside the window, keys of high-density blocks
  (counted above) and padding.

Parts that cover the same query rows are merged with their logsumexp, as in
flash attention. The backward pass reruns the fused backward kernel per part
with the merged output and logsumexp, which yields exact gradients. Nothing
of size T x T is ever stored, so memory stays linear in T for a fixed number
of dense blocks and window width.

Legend: B batch, H query heads, G key/value heads (H % G == 0), R = H // G,
T tokens, P padded tokens (N * bs), D head dim, N kernel blocks, bs block size,
n sub-problems in one batched part, b = B * n, L query rows and S key rows of
one part, Td tokens of high-density blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from densa.density.plan import BlockPlan


@dataclass(frozen=True)
class TokenRows:
    """Rows of n batched sub-problems: sub-problem i covers tokens [start[i], start[i] + length)."""

    start: torch.Tensor  # int64 [n]
    length: int

    def tokens(self, device: torch.device) -> torch.Tensor:
        """Int64 [n * length]: the tokens of every sub-problem, in order."""
        return (self.start[:, None] + torch.arange(self.length)).flatten().to(device)


# Rows of a part: one contiguous token range, or equal-length ranges for batched sub-problems.
Rows = slice | TokenRows


@dataclass(frozen=True)
class _Part:
    """One fused-attention call: query rows of q against key rows of k or of the dense-key buffer."""

    q_rows: Rows
    k_rows: Rows
    from_dense_keys: bool = False
    causal: bool = False
    # Index into the layout's masks: an additive mask [n, 1, L, S] for batched parts.
    mask_id: int | None = None
    # False when no earlier part covers these query rows, so the output is written, not merged.
    merge: bool = True


@dataclass(frozen=True)
class _Layout:
    """The decomposition of one plan into fused-attention parts."""

    padded_len: int
    dense_tokens: torch.Tensor  # int64 [Td]: tokens of high-density blocks, ascending
    parts: tuple[_Part, ...]
    allowed: tuple[torch.Tensor, ...]  # bool [n, L, S] per batched part


def _runs(flags: list[bool]) -> list[tuple[bool, int, int]]:
    """Split a block sequence into maximal runs: (flag, first block, end block)."""
    runs = []
    start = 0
    for i in range(1, len(flags) + 1):
        if i == len(flags) or flags[i] != flags[start]:
            runs.append((flags[start], start, i))
            start = i
    return runs


# Windows are rounded up to a multiple of this many tokens of reach, which
# bounds the number of batched window parts (one fused call each) while
# computing few keys beyond the exact window.
REACH_STEP = 32
# Query tokens per batched window part. The gathered inputs, outputs and
# gradients of a part are several times its query size, so capping it caps
# the temporary memory. 4096 rows times the heads still give the kernel
# hundreds of parallel tasks.
WINDOW_CHUNK_TOKENS = 4096


def _window_parts(plan: BlockPlan, causal: bool) -> list[tuple[TokenRows, TokenRows, torch.Tensor]]:
    """Batch low-density blocks by window reach: per batch (query rows, key rows, allowed [n, bs, S])."""
    bs, seq_len = plan.block_size, plan.seq_len
    padded_len = plan.n_blocks * bs
    sparse = (~plan.dense).nonzero().flatten()
    if sparse.numel() == 0:
        return []

    # A window of w tokens reaches w - 1 tokens back (and forward when bidirectional).
    window = plan.window[sparse]
    reach = -(-(window - 1).clamp(min=0) // REACH_STEP) * REACH_STEP
    token_dense = plan.dense.repeat_interleave(bs)  # [P]
    chunk_blocks = max(1, WINDOW_CHUNK_TOKENS // bs)
    batches = []
    for r in reach.unique().tolist():
        same_reach = (reach == r).nonzero().flatten()
        batches.extend((r, chosen) for chosen in same_reach.split(chunk_blocks))

    parts = []
    for r, chosen in batches:
        blocks, block_window = sparse[chosen], window[chosen]
        q_first = blocks * bs
        n_keys = min(bs + r * (1 if causal else 2), padded_len)
        # The key range starts r tokens before the block, shifted where needed to
        # stay inside the padded sequence. It covers the whole window either way.
        k_first = (q_first - r).clamp(min=0, max=padded_len - n_keys)

        q = q_first[:, None, None] + torch.arange(bs)[None, :, None]  # [n, bs, 1]
        k = k_first[:, None, None] + torch.arange(n_keys)[None, None, :]  # [n, 1, S]
        key_ok = (k < seq_len) & ~token_dense[k]
        allowed = key_ok & ((q - k).abs() < block_window[:, None, None])
        if causal:
            allowed &= k <= q
        # Padding query rows are dropped later. Letting them see every valid key
        # keeps their softmax finite, so they add exact zeros to the gradients.
        allowed |= key_ok & (q >= seq_len)
        parts.append((TokenRows(q_first, bs), TokenRows(k_first, n_keys), allowed))
    return parts


def _build_layout(plan: BlockPlan, causal: bool) -> _Layout:
    bs, seq_len = plan.block_size, plan.seq_len
    dense_flags = plan.dense.tolist()
    dense_tokens = plan.token_dense().nonzero().flatten()
    # Dense tokens before each block boundary: the dense-key prefix visible to a causal run.
    dense_before = torch.cat([torch.zeros(1, dtype=torch.long), (plan.dense.long() * bs).cumsum(0)])
    dense_before = dense_before.clamp(max=dense_tokens.numel())

    # Every query row below seq_len gets exactly one part with merge=False,
    # listed before the parts merged into it. That part is its window or its
    # dense stretch's own keys.
    parts: list[_Part] = []
    allowed_masks = []
    for q_rows, k_rows, allowed in _window_parts(plan, causal):
        parts.append(_Part(q_rows, k_rows, mask_id=len(allowed_masks), merge=False))
        allowed_masks.append(allowed)

    for is_dense, start, end in _runs(dense_flags):
        first, last = start * bs, min(end * bs, seq_len)
        rows = slice(first, last)
        if is_dense and causal:
            parts.append(_Part(rows, rows, causal=True, merge=False))
            if first > 0:
                parts.append(_Part(rows, slice(0, first)))
        elif is_dense:
            parts.append(_Part(rows, slice(0, seq_len), merge=False))
        else:
            n_keys = int(dense_before[start]) if causal else dense_tokens.numel()
            if n_keys > 0:
                parts.append(_Part(rows, slice(0, n_keys), from_dense_keys=True))
    return _Layout(plan.n_blocks * bs, dense_tokens, tuple(parts), tuple(allowed_masks))


def prepare_layout(plan: BlockPlan, causal: bool) -> _Layout:
    """Return the plan's decomposition into fused-attention parts, cached on the plan.

    One plan serves every layer of a forward pass, so the decomposition is
    built once, in time linear in the block count. Call this ahead of the
    forward pass to keep that time out of the first layer.
    """
    key = ("blocksparse_layout", causal)
    if key not in plan._cache:
        plan._cache[key] = _build_layout(plan, causal)
    return plan._cache[key]


def _additive_mask(plan: BlockPlan, layout: _Layout, mask_id: int, batch: int, ref: torch.Tensor) -> torch.Tensor:
    """Additive float mask [batch * n, 1, L, S] in q's dtype and device, cached on the plan."""
    key = ("blocksparse_mask", id(layout), mask_id, batch, ref.dtype, ref.device)
    if key not in plan._cache:
        allowed = layout.allowed[mask_id].to(ref.device)
        mask = torch.zeros(allowed.shape, dtype=ref.dtype, device=ref.device)
        mask.masked_fill_(~allowed, float("-inf"))
        plan._cache[key] = mask.unsqueeze(1).repeat(batch, 1, 1, 1)
    return plan._cache[key]


def _take(x: torch.Tensor, rows: Rows) -> torch.Tensor:
    """Rows of x [B, Hx, P, ...] -> [B, Hx, L, ...], or [B * n, Hx, L, ...] for batched rows."""
    if isinstance(rows, slice):
        return x[:, :, rows]
    batch, heads, padded = x.shape[:3]
    rest = x.shape[3:]
    n, length = rows.start.numel(), rows.length
    # Every window of `length` tokens as a view, then one index_select copies
    # the chosen ones: much faster than token-level advanced indexing.
    windows = x.as_strided(
        (batch, heads, padded - length + 1, length, *rest),
        (x.stride(0), x.stride(1), x.stride(2), *x.stride()[2:]),
        x.storage_offset(),
    )  # [B, Hx, P - L + 1, L, ...]
    picked = windows.index_select(2, rows.start.to(x.device))  # [B, Hx, n, L, ...]
    return picked.transpose(1, 2).reshape(batch * n, heads, length, *rest)


def _add_rows(target: torch.Tensor, rows: Rows, values: torch.Tensor) -> None:
    """Add values to the rows of target [B, Hx, P, ...]; the inverse of _take."""
    if isinstance(rows, slice):
        target[:, :, rows] += values
        return
    target.index_add_(2, rows.tokens(target.device), _unbatch(target, rows, values))


def _put_rows(target: torch.Tensor, rows: Rows, values: torch.Tensor) -> None:
    """Write values into the rows of target [B, Hx, P, ...]; rows are distinct within a part."""
    if isinstance(rows, slice):
        target[:, :, rows] = values
        return
    target.index_copy_(2, rows.tokens(target.device), _unbatch(target, rows, values))


def _unbatch(target: torch.Tensor, rows: TokenRows, values: torch.Tensor) -> torch.Tensor:
    """[B * n, Hx, L, ...] -> [B, Hx, n * L, ...], matching rows.tokens()."""
    batch, heads = target.shape[:2]
    rest = target.shape[3:]
    n, length = rows.start.numel(), rows.length
    values = values.reshape(batch, n, heads, length, *rest).transpose(1, 2)  # [B, Hx, n, L, ...]
    return values.reshape(batch, heads, n * length, *rest)


# -- fused attention on one part: (out, logsumexp) forward and its backward --


def _use_fused_kernel(q: torch.Tensor) -> bool:
    return q.device.type == "cpu" and q.dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _attend(q, k, v, causal: bool, mask, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q [b, H, L, D] over k, v [b, G, S, D] -> out [b, H, L, D], logsumexp [b, H, L]."""
    if _use_fused_kernel(q):
        # The CPU flash kernel behind F.scaled_dot_product_attention. It maps
        # query head h to key/value head h // R itself.
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, attn_mask=mask, scale=scale
        )
        return out, lse
    probs, lse = _probabilities(q, k, causal, mask, scale)
    out = probs @ v.unsqueeze(2).to(probs.dtype)  # [b, G, R, L, D]
    return out.flatten(1, 2).to(q.dtype), lse.flatten(1, 2)


def _attend_backward(grad_out, q, k, v, out, lse, causal: bool, mask, scale: float):
    """Compute one part's (grad_q, grad_k, grad_v) from the merged out and logsumexp of its query rows."""
    if _use_fused_kernel(q):
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out, q, k, v, out, lse, 0.0, causal, attn_mask=mask, scale=scale
        )
    batch, heads, length, dim = q.shape
    groups = k.shape[1]
    probs, _ = _probabilities(q, k, causal, mask, scale, lse)
    dtype = probs.dtype
    grad_out = grad_out.reshape(batch, groups, heads // groups, length, dim).to(dtype)
    out = out.reshape(batch, groups, heads // groups, length, dim).to(dtype)
    q5, k, v = q.reshape(batch, groups, heads // groups, length, dim).to(dtype), k.to(dtype), v.to(dtype)
    grad_probs = grad_out @ v.unsqueeze(2).transpose(-1, -2)  # [b, G, R, L, S]
    grad_scores = probs * (grad_probs - (grad_out * out).sum(-1, keepdim=True))
    grad_q = (grad_scores @ k.unsqueeze(2)) * scale
    grad_k = (grad_scores.transpose(-1, -2) @ q5).sum(2) * scale
    grad_v = (probs.transpose(-1, -2) @ grad_out).sum(2)
    return grad_q.reshape(q.shape).to(q.dtype), grad_k.to(q.dtype), grad_v.to(q.dtype)


def _probabilities(q, k, causal, mask, scale, lse=None):
    """Compute softmax probabilities [b, G, R, L, S] and logsumexp [b, G, R, L] with matmuls.

    This serves devices without the CPU kernel. Half-precision inputs are
    computed in float32, as the fused kernels do.
    """
    batch, heads, length, dim = q.shape
    groups = k.shape[1]
    dtype = torch.promote_types(q.dtype, torch.float32)
    q5 = q.reshape(batch, groups, heads // groups, length, dim).to(dtype)  # [b, G, R, L, D]
    scores = (q5 @ k.unsqueeze(2).transpose(-1, -2).to(dtype)) * scale  # [b, G, R, L, S]
    if mask is not None:
        scores = scores + mask.unsqueeze(2)
    if causal:
        future = torch.ones(length, k.shape[2], dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    if lse is None:
        lse = scores.logsumexp(-1)
    else:
        lse = lse.reshape(batch, groups, heads // groups, length).to(dtype)
    return torch.exp(scores - lse.unsqueeze(-1)), lse


class _BlockSparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan: BlockPlan, causal: bool):
        layout = prepare_layout(plan, causal)
        batch, heads, seq_len, dim = q.shape
        scale = 1.0 / math.sqrt(dim)
        pad = layout.padded_len - seq_len
        q_pad, k_pad, v_pad = (F.pad(x, (0, 0, 0, pad)) if pad else x for x in (q, k, v))
        dense_tokens = layout.dense_tokens.to(q.device)
        k_dense, v_dense = k_pad[:, :, dense_tokens], v_pad[:, :, dense_tokens]  # [B, G, Td, D]

        # Each query row lies in at most two parts. Merging each part into the
        # running output by logsumexp keeps only one part's output alive.
        lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        lse = q.new_full((batch, heads, layout.padded_len), float("-inf"), dtype=lse_dtype)
        out = torch.zeros_like(q_pad)
        for part in layout.parts:
            inputs = _part_inputs(part, plan, layout, q_pad, k_pad, v_pad, k_dense, v_dense)
            part_out, part_lse = _attend(*inputs, scale)
            del inputs
            if part.merge:
                _merge_part(out, lse, part.q_rows, part_out, part_lse)
            else:
                _put_rows(out, part.q_rows, part_out)
                _put_rows(lse, part.q_rows, part_lse.to(lse.dtype))
            # Freed before the next part runs.
            del part_out, part_lse

        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.causal = plan, causal
        return out[:, :, :seq_len]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        plan, causal = ctx.plan, ctx.causal
        layout = prepare_layout(plan, causal)
        seq_len, dim = q.shape[2], q.shape[3]
        scale = 1.0 / math.sqrt(dim)
        pad = layout.padded_len - seq_len
        q_pad, k_pad, v_pad, grad_pad = (
            F.pad(x, (0, 0, 0, pad)) if pad else x for x in (q, k, v, grad_out.contiguous())
        )
        dense_tokens = layout.dense_tokens.to(q.device)
        k_dense, v_dense = k_pad[:, :, dense_tokens], v_pad[:, :, dense_tokens]

        grad_q = torch.zeros_like(q_pad)
        grad_k, grad_v = torch.zeros_like(k_pad), torch.zeros_like(v_pad)
        grad_k_dense, grad_v_dense = torch.zeros_like(k_dense), torch.zeros_like(v_dense)
        for part in layout.parts:
            part_q, part_k, part_v, part_causal, mask = _part_inputs(
                part, plan, layout, q_pad, k_pad, v_pad, k_dense, v_dense
            )
            part_grads = _attend_backward(
                _take(grad_pad, part.q_rows),
                part_q,
                part_k,
                part_v,
                _take(out, part.q_rows),
                _take(lse, part.q_rows),
                part_causal,
                mask,
                scale,
            )
            del part_q, part_k, part_v
            _add_rows(grad_q, part.q_rows, part_grads[0])
            if part.from_dense_keys:
                _add_rows(grad_k_dense, part.k_rows, part_grads[1])
                _add_rows(grad_v_dense, part.k_rows, part_grads[2])
            else:
                _add_rows(grad_k, part.k_rows, part_grads[1])
                _add_rows(grad_v, part.k_rows, part_grads[2])
            # Freed before the next part gathers its inputs.
            del part_grads

        grad_k.index_add_(2, dense_tokens, grad_k_dense)
        grad_v.index_add_(2, dense_tokens, grad_v_dense)
        return grad_q[:, :, :seq_len], grad_k[:, :, :seq_len], grad_v[:, :, :seq_len], None, None


def _merge_part(out: torch.Tensor, lse: torch.Tensor, rows: Rows, part_out: torch.Tensor, part_lse: torch.Tensor):
    """Merge one part's output and logsumexp into the running out [B, H, P, D] and lse [B, H, P]."""
    part_lse = part_lse.to(lse.dtype)
    old_lse = _take(lse, rows)
    new_lse = torch.logaddexp(old_lse, part_lse)
    old_weight = torch.exp(old_lse - new_lse).unsqueeze(-1)
    part_weight = torch.exp(part_lse - new_lse).unsqueeze(-1)
    # In place on the part's own output, which nothing else holds.
    merged = part_out.to(lse.dtype).mul_(part_weight)
    merged.addcmul_(_take(out, rows), old_weight)
    _put_rows(out, rows, merged.to(out.dtype))
    _put_rows(lse, rows, new_lse)


def _part_inputs(part: _Part, plan, layout, q_pad, k_pad, v_pad, k_dense, v_dense):
    """Gather (q, k, v, causal, mask) of one part, with batched sub-problems in the batch dimension."""
    keys, values = (k_dense, v_dense) if part.from_dense_keys else (k_pad, v_pad)
    mask = None
    if part.mask_id is not None:
        mask = _additive_mask(plan, layout, part.mask_id, q_pad.shape[0], q_pad)
    return _take(q_pad, part.q_rows), _take(keys, part.k_rows), _take(values, part.k_rows), part.causal, mask


def blocksparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: BlockPlan, causal: bool = True
) -> torch.Tensor:
    """Attention of q [B, H, T, D] over k, v [B, G, T, D] under the plan's mask -> [B, H, T, D].

    Differentiable in q, k and v. Runs PyTorch's fused flash kernel on CPU and
    an equivalent matmul path on other devices.
    """
    check_attention_inputs(q, k, v, plan)
    return _BlockSparseAttention.apply(q, k, v, plan, causal)


def check_attention_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: BlockPlan) -> None:
    """Raise ValueError unless q [B, H, T, D], k, v [B, G, T, D] and the plan fit together."""
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(
            f"expected q [B, H, T, D] and k, v [B, G, T, D], got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    batch, heads, seq_len, dim = q.shape
    if k.shape[0] != batch or k.shape[2] != seq_len or k.shape[3] != dim:
        raise ValueError(
            f"k and v {tuple(k.shape)} must match q {tuple(q.shape)} in batch, tokens and head dim"
        )
    if heads % k.shape[1]:
        raise ValueError(
            f"{heads} query heads cannot share {k.shape[1]} key/value heads; use a divisor of {heads}"
        )
    if seq_len != plan.seq_len:
        raise ValueError(
            f"the plan covers {plan.seq_len} tokens but q has {seq_len}; build the plan from this sequence"
        )
