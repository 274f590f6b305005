"""One entry point for density-adaptive attention that picks a backend per call.

Legend: B batch, H query heads, G key/value heads, T tokens, D head dim.
"""

from __future__ import annotations

import torch

from densa.attention.blocksparse import blocksparse_attention
from densa.attention.flex import flex_attention
from densa.attention.reference import reference_attention
from densa.density.plan import BlockPlan

BACKENDS = ("auto", "reference", "blocksparse", "flex")

_FUNCTIONS = {
    "reference": reference_attention,
    "blocksparse": blocksparse_attention,
    "flex": flex_attention,
}


def choose_backend(q: torch.Tensor) -> str:
    """Return the backend that "auto" runs for these inputs."""
    if q.device.type == "cuda":
        return "flex"
    # FlexAttention has no CPU backward pass, so training on CPU needs
    # blocksparse. For CPU inference blocksparse was faster too, and it needs
    # no compilation (compiled flex took 2-13 s per new shape on CPU).
    # Forward process CPU time from `benchmarks/attention.py --threads 1`
    # (annual report plans, B=1, 8 heads, D=64, fp32, causal, torch 2.13,
    # a shared 2-core machine): 1K tokens blocksparse 15.5 ms vs flex 16.1 ms,
    # 4K 54 ms vs 74 ms, 16K 360 ms vs 504 ms.
    return "blocksparse"


def density_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: BlockPlan,
    causal: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention of q [B, H, T, D] over k, v [B, G, T, D] under the plan's mask -> [B, H, T, D].

    `backend` is one of BACKENDS. "auto" picks flex on CUDA and blocksparse
    elsewhere. "reference" builds the full T x T mask, so it is meant for tests.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        backend = choose_backend(q)
    return _FUNCTIONS[backend](q, k, v, plan, causal)
