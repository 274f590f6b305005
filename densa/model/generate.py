"""Autoregressive generation with a key/value cache.

Decode-time mask: a generated token counts as low-density, because its density
is unknown until the text exists. Its query attends to its window (sized by
`generated_window` from its distance to the prompt's last dense block) and to
every key of the prompt's high-density blocks. Prompt tokens keep the mask of
their prefill plan, so cached keys and values never need recomputing.

Legend: B batch, T tokens, G key/value heads, D head dim.
"""

from __future__ import annotations

import torch

from densa.density.plan import generated_window
from densa.model.llama import AttentionContext, LayerCache, Transformer


def allocate_caches(model: Transformer, batch: int, max_len: int) -> list[LayerCache]:
    config = model.config
    param = next(model.parameters())
    shape = (batch, config.n_kv_heads, max_len, config.head_dim)  # [B, G, T_max, D]
    return [
        LayerCache(torch.zeros(shape, dtype=param.dtype, device=param.device),
                   torch.zeros(shape, dtype=param.dtype, device=param.device))
        for _ in model.layers
    ]


def decode_mask(context: AttentionContext, model: Transformer, position: int) -> torch.Tensor:
    """Bool mask [B, position + 1]: which keys the token at `position` attends to."""
    keys = torch.arange(position + 1)
    if context.pattern == "dense":
        return torch.ones(1, position + 1, dtype=torch.bool)
    rows = []
    for plan in context.plans:
        if context.pattern == "sliding":
            window = model.config.window
            dense = torch.zeros(position + 1, dtype=torch.bool)
        else:
            window = generated_window(plan, position, model.config.plan)
            dense = torch.zeros(position + 1, dtype=torch.bool)
            dense[: plan.seq_len] = plan.token_dense()
        rows.append(dense | (position - keys < window))
    return torch.stack(rows)


def sample(logits: torch.Tensor, temperature: float, top_k: int | None, generator=None) -> torch.Tensor:
    """Pick the next token [B, 1] from logits [B, V]; temperature 0 means greedy."""
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)


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
) -> torch.Tensor:
    """Continue prompt [B, T] by up to `max_new_tokens` tokens; return [B, T + new]."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} is invalid; use 0 or more")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} is invalid; use 0 (greedy) or a positive value")
    B, T = prompt.shape
    total = min(T + max_new_tokens, model.config.max_seq_len)
    model.eval()

    caches = allocate_caches(model, B, total)
    context = model.attention_context(B, T, density)
    logits = model(prompt, context=context, caches=caches)[:, -1]
    tokens = prompt
    for position in range(T, total):
        next_token = sample(logits.float(), temperature, top_k, generator)
        tokens = torch.cat([tokens, next_token], dim=1)
        if eos_id is not None and bool((next_token == eos_id).all()):
            break
        if position + 1 == total:
            break
        step = AttentionContext(context.pattern, True, context.plans, context.backend,
                                decode_mask(context, model, position).to(prompt.device))
        logits = model(next_token, context=step, caches=caches, start_pos=position)[:, -1]
    return tokens
