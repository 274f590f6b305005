"""A Llama-style decoder with pluggable attention: dense, sliding window or density-adaptive.

The file contains model math only. Parallelism, quantization and compilation are
applied to a built model from outside, so layers are kept addressable by name
(`layers` is a ModuleDict) and may be deleted or replaced: a pipeline stage
keeps only its share, and `tok_embeddings`, `norm` or `output` may be None.

Legend: B batch, T tokens, C model dim, H query heads, G key/value heads,
D head dim, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from densa.attention import density_attention
from densa.density.plan import BlockPlan, generated_window, plan_blocks
from densa.model.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_float = x.float()
        normed = x_float * torch.rsqrt(x_float.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def rope_frequencies(head_dim: int, max_seq_len: int, theta: float) -> torch.Tensor:
    """Complex rotations [T, D/2] for rotary position embeddings."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, T, H, D] by freqs [T, D/2]."""
    B, T, H, D = x.shape
    x_complex = torch.view_as_complex(x.float().reshape(B, T, H, D // 2, 2))
    rotated = torch.view_as_real(x_complex * freqs[None, :, None, :])  # [B, T, H, D/2, 2]
    return rotated.reshape(B, T, H, D).type_as(x)


@dataclass
class LayerCache:
    """Keys and values of one layer for generation: [B, G, T_max, D] each, filled up to `length`."""

    k: torch.Tensor
    v: torch.Tensor
    length: int = 0


@dataclass
class AttentionContext:
    """Attention inputs shared by every layer in one forward pass.

    `plans` holds one BlockPlan per sequence for the sparse patterns (None for
    dense attention). `decode_mask` [B, T_keys] lists the keys every query may
    read: the mask row of the new token when decoding with a cache, or a
    key-padding mask in the bidirectional image-text encoder.
    """

    pattern: str
    causal: bool = True
    plans: list[BlockPlan] | None = None
    backend: str = "auto"
    decode_mask: torch.Tensor | None = None


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.head_dim = config.head_dim
        self.wq = nn.Linear(config.dim, config.n_heads * config.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.wv = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.wo = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        freqs: torch.Tensor,
        context: AttentionContext,
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        # -1 rather than n_heads: under tensor parallelism each shard holds a
        # subset of the heads.
        q = self.wq(x).view(B, T, -1, self.head_dim)
        k = self.wk(x).view(B, T, -1, self.head_dim)
        v = self.wv(x).view(B, T, -1, self.head_dim)
        q, k = apply_rope(q, freqs), apply_rope(k, freqs)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H or G, T, D]

        if cache is not None and hasattr(cache, "attend"):
            # Caches that evict keys or prefill in chunks (densa.attention.kv_cache)
            # store this step's keys and values and compute the attention themselves.
            out = cache.attend(q, k, v, context)
            return self.wo(out.transpose(1, 2).reshape(B, T, -1))

        if cache is not None:
            start = cache.length
            cache.k[:, :, start : start + T] = k
            cache.v[:, :, start : start + T] = v
            cache.length = start + T
            if start > 0:
                # Decoding one token: attend over everything cached so far.
                k, v = cache.k[:, :, : cache.length], cache.v[:, :, : cache.length]

        if context.decode_mask is not None:
            mask = context.decode_mask[:, None, None, :]  # [B, 1, 1, T_keys]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        elif context.pattern == "dense":
            out = F.scaled_dot_product_attention(q, k, v, is_causal=context.causal, enable_gqa=True)
        else:
            out = torch.cat(
                [
                    density_attention(q[i : i + 1], k[i : i + 1], v[i : i + 1], plan, context.causal, context.backend)
                    for i, plan in enumerate(context.plans)
                ]
            )
        out = out.transpose(1, 2).reshape(B, T, -1)  # [B, T, H * D]
        return self.wo(out)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.feed_forward = FeedForward(config.dim, config.ffn_dim)

    def forward(self, x, freqs, context: AttentionContext, cache: LayerCache | None = None):
        x = x + self.attention(self.attention_norm(x), freqs, context, cache)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(config) for i in range(config.n_layers)})
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.register_buffer(
            "freqs", rope_frequencies(config.head_dim, config.max_seq_len, config.rope_theta), persistent=False
        )
        self.init_weights()

    def init_weights(self) -> None:
        """Normal(0, 0.02) weights, with residual output projections scaled by 1/sqrt(2 n_layers)."""
        for name, param in self.named_parameters():
            if param.dim() == 2:
                std = 0.02
                if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
                    std /= math.sqrt(2 * self.config.n_layers)
                nn.init.normal_(param, mean=0.0, std=std)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def attention_context(
        self, B: int, T: int, density: torch.Tensor | None, causal: bool = True
    ) -> AttentionContext:
        """Build the per-sequence block plans that the configured attention pattern needs."""
        config = self.config
        if config.attention == "dense":
            return AttentionContext("dense", causal)
        if config.attention == "sliding":
            plan = BlockPlan.sliding(T, config.window, config.plan.block_size)
            return AttentionContext("sliding", causal, [plan] * B, config.backend)
        if density is None:
            raise ValueError("density attention needs token densities [B, T]; pass density=")
        if tuple(density.shape) != (B, T):
            raise ValueError(f"density has shape {tuple(density.shape)} but the input is [B, T] = [{B}, {T}]")
        plans = [plan_blocks(row.detach().float().cpu(), config.plan) for row in density]
        return AttentionContext("density", causal, plans, config.backend)

    def forward(
        self,
        tokens: torch.Tensor,
        density: torch.Tensor | None = None,
        context: AttentionContext | None = None,
        caches: list[LayerCache] | None = None,
        start_pos: int = 0,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Return logits [B, T, V] for tokens [B, T] (or hidden states [B, T, C] on a pipeline stage).

        `density` [B, T] is required for density attention. A pipeline stage
        without embeddings receives hidden states [B, T, C] as `tokens`.
        `last_only` projects only the last position ([B, 1, V]): serving needs
        no more, and for a 64K-token prompt the full T x V logits would outweigh
        the whole key/value cache.
        """
        B, T = tokens.shape[:2]
        if start_pos + T > self.config.max_seq_len:
            raise ValueError(
                f"sequence of {start_pos + T} tokens exceeds max_seq_len={self.config.max_seq_len}; "
                "shorten the input or raise max_seq_len"
            )
        if context is None:
            context = self.attention_context(B, T, density)
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        freqs = self.freqs[start_pos : start_pos + T]
        for i, layer in enumerate(self.layers.values()):
            h = layer(h, freqs, context, None if caches is None else caches[i])
        if last_only:
            h = h[:, -1:]
        if self.norm is not None:
            h = self.norm(h)
        return self.output(h) if self.output is not None else h
