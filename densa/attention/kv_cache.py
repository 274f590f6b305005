"""A density-aware key/value cache: keep the keys a plan can still read, evict the rest.

Decode-time mask. A generated token counts as low-density, because its
density is unknown until the text exists. Its query attends to its window and
to every key of the prompt's high-density blocks. The window comes from
`generated_window`, sized by the distance to the prompt's last high-density
block (for sliding attention it is the model's window). Prompt queries keep
the mask of their prefill plan. So once the prompt is processed, no later
query reads a low-density key older than the largest remaining window, and
each layer keeps only:

* the keys and values of the prompt's high-density tokens, which never leave;
* a ring buffer of the last W low-density tokens, where W is the largest
  window of any later query; token p lives in ring slot p mod W.

Keys are cached after RoPE, so a kept key is valid at any later step. Each
layer stores k, v [B, G, S, D] with S = (high-density tokens) + W, and the
position of every slot [B, S] (-1 for an empty slot), which the mask reads.
Memory is bounded by S, whatever the number of generated tokens.

Exactness. Every key that the decode mask allows is in the cache exactly once,
so attention over the kept keys equals attention over a full cache under the
same mask, up to float summation order, and greedy decoding yields the same
tokens. If a decode mask asks for an evicted key (say a planner marked a
generated token high-density), `attend` raises instead of returning a
different result.

Trade-off. Generated text is never re-scored. A generated passage that would
count as high-density still attends only to its window and the prompt's
high-density keys, and its own keys leave the ring like any low-density key.
Re-scoring the density of the generated text every so often would let such
passages keep their keys. But any new high-density query would also need
the keys already evicted, so it means either re-running prefill over the
evicted text or accepting a mask that differs from the full cache's.

Prefill. A whole prompt in one pass runs the model's density attention
backend, then stores what the cache keeps. In chunks (densa.attention.chunked),
a high-density query attends to every earlier key, so until the last
high-density prompt block has been processed each layer also keeps a staging
copy of every key up to that block's end [B, G, T_stage, D], freed right
after. The cache's prefill memory is therefore linear in T_stage, never
quadratic in T.

Legend: B batch, H query heads, G key/value heads, T tokens, D head dim,
S cache slots, W ring slots.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from densa.attention.chunked import chunk_attention
from densa.attention.dispatch import density_attention
from densa.density.plan import BlockPlan


@dataclass(frozen=True)
class SlotLayout:
    """Slot assignment of the kept tokens, shared by every layer of a model.

    Slots [0, n_dense) hold the high-density prompt tokens in order; slots
    [n_dense, n_dense + ring) are the ring buffer. `dense_slot` [B, T] maps a
    prompt token to its slot (-1 for low-density tokens). `stage_len` is the
    prompt prefix that high-density queries read during chunked prefill.
    """

    plans: tuple[BlockPlan, ...]
    n_dense: int
    ring: int
    stage_len: int
    dense_slot: torch.Tensor

    @property
    def slots(self) -> int:
        return self.n_dense + self.ring

    @property
    def seq_len(self) -> int:
        return self.plans[0].seq_len

    @classmethod
    def build(cls, plans: list[BlockPlan], decode_windows: list[int]) -> "SlotLayout":
        """Lay out the cache for prompts with these plans and generated tokens with these windows.

        `decode_windows[b]` is the largest window a generated token of sequence
        b will have, in tokens (the window at the first generated position,
        since generated windows only shrink with distance from dense text).
        """
        if not plans:
            raise ValueError("a density-aware cache needs at least one plan; got none")
        if len(decode_windows) != len(plans):
            raise ValueError(f"got {len(decode_windows)} decode windows for {len(plans)} plans; pass one per sequence")
        for window in decode_windows:
            if not isinstance(window, int) or window < 1:
                raise ValueError(f"decode window={window!r} is invalid; use a positive number of tokens")
        seq_len = plans[0].seq_len
        if any(plan.seq_len != seq_len for plan in plans):
            raise ValueError("every plan of a batch must cover the same prompt length; pad or batch by length")

        ring, n_dense, stage_len = 1, 0, 0
        dense_slot = torch.full((len(plans), seq_len), -1, dtype=torch.long)
        for b, (plan, decode_window) in enumerate(zip(plans, decode_windows)):
            token_dense = plan.token_dense()
            count = int(token_dense.sum())
            dense_slot[b, token_dense] = torch.arange(count)
            n_dense = max(n_dense, count)
            low_windows = plan.window[~plan.dense]
            ring = max(ring, decode_window, int(low_windows.max()) if low_windows.numel() else 1)
            if count:
                last_dense = int(plan.dense.nonzero().max())
                stage_len = max(stage_len, min((last_dense + 1) * plan.block_size, seq_len))
        return cls(tuple(plans), n_dense, ring, stage_len, dense_slot)


class DensityLayerCache:
    """Kept keys and values of one layer: k, v [B, G, S, D], slot positions [B, S]."""

    def __init__(
        self,
        layout: SlotLayout,
        n_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        B = len(layout.plans)
        shape = (B, n_kv_heads, layout.slots, head_dim)  # [B, G, S, D]
        self.layout = layout
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.positions = torch.full((B, layout.slots), -1, dtype=torch.long, device=device)
        self.length = 0
        self.stage_k: torch.Tensor | None = None
        self.stage_v: torch.Tensor | None = None

    def nbytes(self) -> int:
        """Bytes held now: kept keys, values and positions, plus the prefill staging copy if any."""
        tensors = [self.k, self.v, self.positions, self.stage_k, self.stage_v]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def kept_positions(self, row: int = 0) -> torch.Tensor:
        """Sorted positions of the tokens sequence `row` keeps."""
        positions = self.positions[row]
        return positions[positions >= 0].sort().values

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, context) -> torch.Tensor:
        """Store the step's k, v [B, G, T, D] and return the attention of q [B, H, T, D] -> [B, H, T, D].

        The step is the whole prompt, a prompt chunk continuing the previous
        one, or one generated token (which needs `context.decode_mask`).
        """
        T = q.shape[2]
        start, seq_len = self.length, self.layout.seq_len
        if not context.causal:
            raise ValueError("the density-aware cache serves causal generation; pass a causal context")
        if start == 0 and T == seq_len:
            out = self._attend_prompt(q, k, v, context)
        elif start + T <= seq_len:
            out = self._attend_chunk(q, k, v)
        elif start >= seq_len and T == 1:
            out = self._attend_generated(q, k, v, context.decode_mask)
        else:
            raise ValueError(
                f"cannot process {T} tokens at position {start} of a {seq_len}-token prompt; feed the prompt "
                "whole or in chunks, then generated tokens one at a time"
            )
        self.length = start + T
        return out

    # -- the three kinds of step --

    def _attend_prompt(self, q, k, v, context) -> torch.Tensor:
        out = torch.cat([
            density_attention(q[b : b + 1], k[b : b + 1], v[b : b + 1], plan, True, context.backend)
            for b, plan in enumerate(self.layout.plans)
        ])
        self._store_dense(k, v, 0)
        self._store_ring(k, v, 0)
        return out

    def _attend_chunk(self, q, k, v) -> torch.Tensor:
        layout, start = self.layout, self.length
        end = start + q.shape[2]
        if start < layout.stage_len:
            if self.stage_k is None:
                stage = (k.shape[0], k.shape[1], layout.stage_len, k.shape[3])  # [B, G, T_stage, D]
                self.stage_k = k.new_zeros(stage)
                self.stage_v = v.new_zeros(stage)
            staged = min(end, layout.stage_len) - start
            self.stage_k[:, :, start : start + staged] = k[:, :, :staged]
            self.stage_v[:, :, start : start + staged] = v[:, :, :staged]
        self._store_dense(k, v, start)

        outs = []
        for b, plan in enumerate(layout.plans):
            valid = self.positions[b] >= 0
            stage_k = None if self.stage_k is None else self.stage_k[b : b + 1]
            stage_v = None if self.stage_v is None else self.stage_v[b : b + 1]
            outs.append(chunk_attention(
                q[b : b + 1], k[b : b + 1], v[b : b + 1], start, plan,
                self.k[b : b + 1, :, valid], self.v[b : b + 1, :, valid], self.positions[b, valid],
                stage_k, stage_v,
            ))
        self._store_ring(k, v, start)
        if end >= layout.stage_len:
            # The last high-density query has been processed: the staged prefix is no longer read.
            self.stage_k = self.stage_v = None
        return torch.cat(outs)

    def _attend_generated(self, q, k, v, decode_mask) -> torch.Tensor:
        position = self.length
        if decode_mask is None:
            raise ValueError(
                "decoding with the density-aware cache needs context.decode_mask; "
                "build it with densa.model.generate.decode_mask"
            )
        if decode_mask.shape[-1] != position + 1:
            raise ValueError(
                f"decode mask covers {decode_mask.shape[-1]} keys but the token at position {position} "
                f"has {position + 1}"
            )
        decode_mask = decode_mask.to(device=q.device, dtype=torch.bool)
        # The ring holds at least the token's window, so the new token goes in
        # first and one attention call over the slots covers every allowed key.
        self._store_ring(k, v, position)
        valid = self.positions >= 0
        kept = decode_mask.gather(1, self.positions.clamp(min=0)) & valid  # [B, S]
        if not torch.equal(kept.sum(1), decode_mask.sum(1)):
            raise ValueError(
                f"the decode mask at position {position} reads keys this cache evicted; the density-aware "
                "cache needs generated tokens to be low-density (see densa.attention.kv_cache), so use "
                "cache='full' for this mask"
            )
        return F.scaled_dot_product_attention(
            q, self.k, self.v, attn_mask=kept[:, None, None, :], enable_gqa=True
        )

    # -- storing and evicting --

    def _store_dense(self, k: torch.Tensor, v: torch.Tensor, start: int) -> None:
        """Copy the step's high-density prompt tokens into their dense slots."""
        end = min(start + k.shape[2], self.layout.seq_len)
        if end <= start:
            return
        slots = self.layout.dense_slot[:, start:end].to(k.device)  # [B, T_step]
        for b in range(k.shape[0]):
            chosen = (slots[b] >= 0).nonzero().flatten()
            if chosen.numel():
                self.k[b, :, slots[b, chosen]] = k[b, :, chosen]
                self.v[b, :, slots[b, chosen]] = v[b, :, chosen]
                self.positions[b, slots[b, chosen]] = start + chosen

    def _store_ring(self, k: torch.Tensor, v: torch.Tensor, start: int) -> None:
        """Write the step's low-density tokens into the ring, evicting what they replace.

        Only the last W tokens of the step can still be read later, and they
        fall into distinct ring slots.
        """
        layout = self.layout
        T = k.shape[2]
        first = max(start, start + T - layout.ring)
        positions = torch.arange(first, start + T, device=k.device)
        offset = first - start
        is_prompt = positions < layout.seq_len
        for b in range(k.shape[0]):
            low = torch.ones_like(positions, dtype=torch.bool)
            low[is_prompt] = layout.dense_slot[b, positions[is_prompt].cpu()].to(k.device) < 0
            chosen = low.nonzero().flatten()
            if chosen.numel():
                slots = layout.n_dense + positions[chosen] % layout.ring
                self.k[b, :, slots] = k[b, :, offset + chosen]
                self.v[b, :, slots] = v[b, :, offset + chosen]
                self.positions[b, slots] = positions[chosen]


def allocate_density_caches(
    plans: list[BlockPlan],
    decode_windows: list[int],
    n_layers: int,
    n_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> list[DensityLayerCache]:
    """One density-aware cache per layer, sharing one slot layout (see SlotLayout.build)."""
    layout = SlotLayout.build(plans, decode_windows)
    return [DensityLayerCache(layout, n_kv_heads, head_dim, dtype, device) for _ in range(n_layers)]


def cache_bytes(caches: list) -> int:
    """Bytes of keys and values (and slot positions) held by a list of layer caches, full or density-aware."""
    total = 0
    for cache in caches:
        if hasattr(cache, "nbytes"):
            total += cache.nbytes()
        else:
            total += cache.k.numel() * cache.k.element_size() + cache.v.numel() * cache.v.element_size()
    return total
