"""Density-adaptive attention for Hugging Face Llama- and Qwen2-family models.

The integration goes through transformers' attention registry (transformers
5.x): `enable(model)` registers the function `densa_attention` under the name
"densa" in `AttentionInterface` (with the SDPA mask builder in
`AttentionMaskInterface`) and switches the model to it with
`set_attn_implementation`. The model's own projections, RoPE and cache stay
as they are; only the attention step changes.

Plans come from the model's own tokenizer: `density_plans` encodes the text
with `return_offsets_mapping=True` (or takes precomputed offsets), scores the
tokens with DensityAnalyzer and builds one BlockPlan per text. The plans reach
the attention function through the keyword argument `densa=` of the model
call, or through the `use_plans` context manager, which also covers
`model.generate`.

    from densa import hf
    hf.enable(model)
    plans = hf.density_plans(tokenizer, text)
    ids = tokenizer(text, return_tensors="pt").input_ids
    with hf.use_plans(plans):
        logits = model(ids).logits
    tokens = hf.generate_greedy(model, ids, plans, 64, cache="density", prefill_chunk=2048)

Mask rule: prompt queries follow their plan (densa.density.plan), and a
generated query is low-density: its window from `generated_window` plus every
high-density prompt key. cache="full" runs that rule over the model's usual
cache. cache="density" keeps only what the rule reads
(densa.attention.kv_cache). The model then runs with use_cache=False and
explicit position ids, and the attention function stores keys and values
itself, so the prompt may also be fed in chunks.

NOTE: padding is not supported: batch only prompts of one length. A padding
mask raises an error instead of being ignored. Qwen2 layers with a sliding
window are run with the plan's mask, not their own window.

Legend: B batch, H query heads, G key/value heads, T tokens, D head dim.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from densa.attention.chunked import chunk_bounds
from densa.attention.dispatch import BACKENDS, density_attention
from densa.attention.kv_cache import DensityLayerCache, allocate_density_caches
from densa.density.analyzer import DensityAnalyzer
from densa.density.plan import BlockPlan, PlanConfig, generated_window, plan_blocks
from densa.model.generate import decode_mask_row
from densa.model.llama import AttentionContext

ATTENTION_NAME = "densa"
CACHE_KINDS = ("full", "density")


@dataclass
class DensityPlans:
    """Plans of one batch of prompts, with the settings the attention function needs.

    `caches` contains the per-layer density-aware caches while `generate_greedy`
    runs with cache="density", and is None otherwise.
    """

    plans: list[BlockPlan]
    config: PlanConfig
    backend: str = "auto"
    caches: list[DensityLayerCache] | None = None

    def __post_init__(self) -> None:
        if not self.plans:
            raise ValueError("DensityPlans needs at least one plan; pass one per prompt")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend={self.backend!r} is invalid; choose one of {', '.join(BACKENDS)}")

    @property
    def seq_len(self) -> int:
        return self.plans[0].seq_len

    def decode_mask(self, position: int) -> torch.Tensor:
        """Bool [B, position + 1]: the keys a generated token at `position` attends to."""
        return torch.stack([
            decode_mask_row(plan, position, generated_window(plan, position, self.config))
            for plan in self.plans
        ])


def _is_offsets(value) -> bool:
    """Check whether `value` is one list of (start, end) pairs, not a tokenizer or a batch of lists."""
    return (
        isinstance(value, Sequence)
        and len(value) > 0
        and all(isinstance(pair, Sequence) and len(pair) == 2 and isinstance(pair[0], int) for pair in value)
    )


def density_plans(
    tokenizer_or_offsets,
    text: str | Sequence[str],
    plan_config: PlanConfig | None = None,
    analyzer: DensityAnalyzer | None = None,
    add_special_tokens: bool = True,
    backend: str = "auto",
) -> DensityPlans:
    """Build the block plans of `text` (one string or a batch) for a model's tokenization.

    `tokenizer_or_offsets` is a fast Hugging Face tokenizer (called with
    `return_offsets_mapping=True` and `add_special_tokens`, so encode the
    model input the same way), or precomputed (start, end) character offsets:
    one list per text, or a single list for a single text. Special tokens
    with empty offsets get the analyser's weight for text outside words.
    """
    texts = [text] if isinstance(text, str) else list(text)
    if not texts or not all(isinstance(item, str) for item in texts):
        raise ValueError("text must be a string or a non-empty list of strings")
    config = plan_config or PlanConfig()
    analyzer = analyzer or DensityAnalyzer()

    if callable(tokenizer_or_offsets):
        if not getattr(tokenizer_or_offsets, "is_fast", False):
            raise ValueError(
                f"{type(tokenizer_or_offsets).__name__} cannot return offsets; pass a fast tokenizer "
                "(PreTrainedTokenizerFast) or precomputed offsets"
            )
        encoded = tokenizer_or_offsets(texts, return_offsets_mapping=True, add_special_tokens=add_special_tokens)
        offsets = [[tuple(pair) for pair in row] for row in encoded["offset_mapping"]]
    elif _is_offsets(tokenizer_or_offsets) and len(texts) == 1:
        offsets = [list(tokenizer_or_offsets)]
    else:
        offsets = list(tokenizer_or_offsets)
        if len(offsets) != len(texts):
            raise ValueError(f"got {len(offsets)} offset lists for {len(texts)} texts; pass one list per text")

    plans = [plan_blocks(analyzer.analyze(item, row).density, config) for item, row in zip(texts, offsets)]
    return DensityPlans(plans, config, backend)


# The plans of the model call in progress, when given through `use_plans`.
_ACTIVE_PLANS: contextvars.ContextVar[DensityPlans | None] = contextvars.ContextVar("densa_plans", default=None)


@contextlib.contextmanager
def use_plans(plans: DensityPlans) -> Iterator[DensityPlans]:
    """Make `plans` the plans of every densa attention call inside the block."""
    token = _ACTIVE_PLANS.set(plans)
    try:
        yield plans
    finally:
        _ACTIVE_PLANS.reset(token)


def register() -> None:
    """Register "densa" in transformers' attention and attention-mask registries."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, densa_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def enable(model) -> None:
    """Switch a Hugging Face model to density-adaptive attention (registering it first)."""
    register()
    model.set_attn_implementation(ATTENTION_NAME)


def _check_no_padding(attention_mask: torch.Tensor | None, q_len: int, k_len: int) -> None:
    """Raise if the model's mask hides a key that causal attention would show (a padding mask)."""
    if attention_mask is None:
        return
    if attention_mask.dtype == torch.bool:
        hidden = ~attention_mask
    else:
        hidden = attention_mask < 0
    q_pos = torch.arange(k_len - q_len, k_len, device=hidden.device)
    causal = torch.arange(k_len, device=hidden.device)[None, :] <= q_pos[:, None]  # [T_q, T_k]
    if (hidden[..., -q_len:, -k_len:] & causal).any():
        raise ValueError(
            "densa attention does not support padding masks; batch prompts of one length "
            "(or run them one at a time)"
        )


def densa_attention(
    module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The "densa" attention function: q [B, H, T_q, D] over k, v [B, G, T_k, D] -> ([B, T_q, H, D], None).

    Follows transformers' attention-function signature. Computes the prompt
    with the plan's backend, and a generated token with the decode rule. With
    `DensityPlans.caches` set, the layer's density-aware cache stores the keys
    and computes the attention.
    """
    plans = kwargs.get("densa") or _ACTIVE_PLANS.get()
    if plans is None:
        raise ValueError(
            "densa attention has no plans for this call; wrap it in densa.hf.use_plans(plans) "
            "or pass densa=plans to the model"
        )
    if dropout:
        raise ValueError("densa attention runs inference only; call model.eval() to turn attention dropout off")
    B, H, q_len, D = query.shape
    if B != len(plans.plans):
        raise ValueError(f"the batch has {B} sequences but {len(plans.plans)} plans; build one plan per prompt")
    if scaling is not None and not math.isclose(scaling, D**-0.5):
        # The backends scale by 1/sqrt(D); fold the model's own scale into q.
        query = query * (scaling * math.sqrt(D))

    if plans.caches is not None:
        cache = plans.caches[module.layer_idx]
        decode = None
        if cache.length >= plans.seq_len:
            decode = plans.decode_mask(cache.length).to(query.device)
        context = AttentionContext("density", True, plans.plans, plans.backend, decode)
        out = cache.attend(query, key, value, context)
        return out.transpose(1, 2).contiguous(), None

    k_len = key.shape[2]
    _check_no_padding(attention_mask, q_len, k_len)
    if q_len == k_len == plans.seq_len:
        out = torch.cat([
            density_attention(query[b : b + 1], key[b : b + 1], value[b : b + 1], plan, True, plans.backend)
            for b, plan in enumerate(plans.plans)
        ])
    elif q_len == 1 and k_len > plans.seq_len:
        mask = plans.decode_mask(k_len - 1).to(query.device)  # [B, T_k]
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask[:, None, None, :], enable_gqa=key.shape[1] != H
        )
    else:
        raise ValueError(
            f"densa attention got {q_len} queries over {k_len} keys for a {plans.seq_len}-token plan; feed "
            "the whole prompt, then one token at a time (chunked prefill needs cache='density')"
        )
    return out.transpose(1, 2).contiguous(), None


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


@torch.no_grad()
def generate_greedy(
    model,
    input_ids: torch.Tensor,
    plans: DensityPlans,
    max_new_tokens: int,
    cache: str = "full",
    prefill_chunk: int | None = None,
) -> torch.Tensor:
    """Greedy continuation of input_ids [B, T] by `max_new_tokens` tokens -> [B, T + new].

    cache="full" uses the model's own cache (transformers' DynamicCache);
    cache="density" keeps only the keys the decode rule reads, and takes the
    prompt in chunks of `prefill_chunk` queries when given. The model must be
    enabled with `enable(model)`.
    """
    if cache not in CACHE_KINDS:
        raise ValueError(f"cache={cache!r} is invalid; choose one of {', '.join(CACHE_KINDS)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} is invalid; use 1 or more")
    if model.config._attn_implementation != ATTENTION_NAME:
        raise ValueError("the model does not use densa attention; call densa.hf.enable(model) first")
    B, T = input_ids.shape
    if T != plans.seq_len:
        raise ValueError(f"input_ids has {T} tokens but the plans cover {plans.seq_len}; encode the same text")
    model.eval()

    if cache == "full":
        if prefill_chunk is not None:
            raise ValueError("prefill_chunk needs cache='density'; the full cache prefills the whole prompt")
        # transformers renamed `past_key_values` to `cache` during 5.x.
        cache_name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        out = model(input_ids=input_ids, use_cache=True, logits_to_keep=1, densa=plans)
        tokens = input_ids
        for position in range(T, T + max_new_tokens):
            next_token = out.logits[:, -1].argmax(-1, keepdim=True)  # [B, 1]
            tokens = torch.cat([tokens, next_token], dim=1)
            if position + 1 < T + max_new_tokens:
                past = {cache_name: getattr(out, cache_name)}
                out = model(input_ids=next_token, use_cache=True, logits_to_keep=1, densa=plans, **past)
        return tokens

    config = model.config
    param = next(model.parameters())
    windows = [generated_window(plan, T, plans.config) for plan in plans.plans]
    session = DensityPlans(plans.plans, plans.config, plans.backend)
    session.caches = allocate_density_caches(
        plans.plans, windows, config.num_hidden_layers, config.num_key_value_heads, _head_dim(config),
        param.dtype, param.device,
    )
    device = input_ids.device

    def step(tokens: torch.Tensor, start: int) -> torch.Tensor:
        positions = torch.arange(start, start + tokens.shape[1], device=device)[None].expand(B, -1)
        out = model(input_ids=tokens, position_ids=positions, use_cache=False, logits_to_keep=1, densa=session)
        return out.logits[:, -1]

    bounds = [(0, T)] if prefill_chunk is None else chunk_bounds(T, prefill_chunk)
    for start, end in bounds:
        logits = step(input_ids[:, start:end], start)
    tokens = input_ids
    for position in range(T, T + max_new_tokens):
        next_token = logits.argmax(-1, keepdim=True)  # [B, 1]
        tokens = torch.cat([tokens, next_token], dim=1)
        if position + 1 < T + max_new_tokens:
            logits = step(next_token, position)
    return tokens
