"""Autoregressive generation with a key/value cache: full, or density-aware with chunked prefill.

Decode-time mask: a generated token counts as low-density, because its density
is unknown until the text exists. Its query attends to its window (sized by
`generated_window` from its distance to the prompt's last dense block) and to
every key of the prompt's high-density blocks. Prompt tokens keep the mask of
their prefill plan, so cached keys and values never need recomputing.

Two caches implement that mask. cache="full" keeps every key [B, G, T_max, D].
cache="density" (densa.attention.kv_cache) keeps only the high-density prompt
keys and a ring buffer of the largest window, which is exact under this mask
and bounded in memory; it also accepts the prompt in chunks of
`prefill_chunk` queries (densa.attention.chunked), so long prompts never need
T x T memory.

Legend: B batch, T tokens, G key/value heads, D head dim, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from densa.attention.chunked import chunk_bounds
from densa.attention.kv_cache import allocate_density_caches
from densa.density.plan import BlockPlan, generated_window
from densa.model.llama import AttentionContext, LayerCache, Transformer

CACHE_KINDS = ("full", "density")


def allocate_caches(model: Transformer, batch: int, max_len: int) -> list[LayerCache]:
    config = model.config
    param = next(model.parameters())
    shape = (batch, config.n_kv_heads, max_len, config.head_dim)  # [B, G, T_max, D]
    return [
        LayerCache(torch.zeros(shape, dtype=param.dtype, device=param.device),
                   torch.zeros(shape, dtype=param.dtype, device=param.device))
        for _ in model.layers
    ]


def decode_windows(context: AttentionContext, model: Transformer, position: int) -> list[int]:
    """Window in tokens of a generated token at `position`, one per sequence (sparse patterns only)."""
    if context.pattern == "sliding":
        return [model.config.window] * len(context.plans)
    return [generated_window(plan, position, model.config.plan) for plan in context.plans]


def decode_mask_row(plan: BlockPlan, position: int, window: int, dense_keys: bool = True) -> torch.Tensor:
    """Bool [position + 1]: the keys a generated token at `position` attends to under the decode rule.

    It sees the keys inside its window of `window` tokens and, when
    `dense_keys`, every key of the prompt's high-density blocks.
    """
    keys = torch.arange(position + 1)
    dense = torch.zeros(position + 1, dtype=torch.bool)
    if dense_keys:
        dense[: plan.seq_len] = plan.token_dense()
    return dense | (position - keys < window)


def decode_mask(context: AttentionContext, model: Transformer, position: int) -> torch.Tensor:
    """Bool mask [B, position + 1]: which keys the token at `position` attends to."""
    if context.pattern == "dense":
        return torch.ones(1, position + 1, dtype=torch.bool)
    windows = decode_windows(context, model, position)
    dense_keys = context.pattern == "density"
    return torch.stack([decode_mask_row(plan, position, window, dense_keys)
                        for plan, window in zip(context.plans, windows)])


def sample(logits: torch.Tensor, temperature: float, top_k: int | None, generator=None) -> torch.Tensor:
    """Pick the next token [B, 1] from logits [B, V]; temperature 0 means greedy."""
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)


@dataclass
class DecodeState:
    """A prefilled prompt ready for decoding: its context, per-layer caches and the next position."""

    context: AttentionContext
    caches: list
    position: int


def last_logits(
    model: Transformer, tokens: torch.Tensor, context: AttentionContext, caches: list, start_pos: int
) -> torch.Tensor:
    """Run tokens [B, T] through the model with caches and return the logits [B, V] of the last one."""
    return model(tokens, context=context, caches=caches, start_pos=start_pos, last_only=True)[:, -1]


@torch.no_grad()
def prefill(
    model: Transformer,
    prompt: torch.Tensor,
    density: torch.Tensor | None = None,
    cache: str = "full",
    prefill_chunk: int | None = None,
    max_len: int | None = None,
) -> tuple[torch.Tensor, DecodeState]:
    """Process prompt [B, T] into a cache; return the last token's logits [B, V] and the decode state.

    `max_len` sizes the full cache (default: the model's max_seq_len); the
    density-aware cache needs no size. `prefill_chunk` feeds the prompt that
    many queries at a time and needs cache="density".
    """
    if cache not in CACHE_KINDS:
        raise ValueError(f"cache={cache!r} is invalid; choose one of {', '.join(CACHE_KINDS)}")
    B, T = prompt.shape
    config = model.config
    context = model.attention_context(B, T, density)
    if cache == "full":
        if prefill_chunk is not None:
            raise ValueError("prefill_chunk needs cache='density'; the full cache prefills the whole prompt at once")
        caches = allocate_caches(model, B, max_len or config.max_seq_len)
        return last_logits(model, prompt, context, caches, 0), DecodeState(context, caches, T)

    if context.pattern == "dense":
        raise ValueError(
            "cache='density' needs attention 'density' or 'sliding'; dense attention reads every key, "
            "so use cache='full'"
        )
    param = next(model.parameters())
    caches = allocate_density_caches(
        context.plans, decode_windows(context, model, T), len(model.layers),
        config.n_kv_heads, config.head_dim, param.dtype, param.device,
    )
    bounds = [(0, T)] if prefill_chunk is None else chunk_bounds(T, prefill_chunk)
    for start, end in bounds:
        logits = last_logits(model, prompt[:, start:end], context, caches, start)
    return logits, DecodeState(context, caches, T)


@torch.no_grad()
def decode_step(model: Transformer, state: DecodeState, tokens: torch.Tensor) -> torch.Tensor:
    """Feed the generated tokens [B, 1] at `state.position`; return their logits [B, V] and advance."""
    context = state.context
    mask = decode_mask(context, model, state.position).to(tokens.device)
    step = AttentionContext(context.pattern, True, context.plans, context.backend, mask)
    logits = last_logits(model, tokens, step, state.caches, state.position)
    state.position += 1
    return logits


@torch.no_grad()
def generate(
    model: Transformer,
    prompt: torch.Tensor,
    max_new_tokens: int,
    density: torch.Tensor | None = None,
    temperature: float = 0.8,
    top_k: int | None = 50,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
    cache: str = "full",
    prefill_chunk: int | None = None,
) -> torch.Tensor:
    """Continue prompt [B, T] by up to `max_new_tokens` tokens; return [B, T + new].

    cache="density" keeps only the keys the decode-time mask can read (see
    the module docstring); `prefill_chunk` then feeds the prompt in chunks.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} is invalid; use 0 or more")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} is invalid; use 0 (greedy) or a positive value")
    B, T = prompt.shape
    total = min(T + max_new_tokens, model.config.max_seq_len)
    model.eval()

    logits, state = prefill(model, prompt, density, cache, prefill_chunk, max_len=total)
    tokens = prompt
    for position in range(T, total):
        next_token = sample(logits.float(), temperature, top_k, generator)
        tokens = torch.cat([tokens, next_token], dim=1)
        if eos_id is not None and bool((next_token == eos_id).all()):
            break
        if position + 1 == total:
            break
        logits = decode_step(model, state, next_token)
    return tokens
