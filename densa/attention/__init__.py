"""Density-adaptive attention backends and the dispatcher that picks one."""

from densa.attention.blocksparse import blocksparse_attention
from densa.attention.dispatch import BACKENDS, choose_backend, density_attention
from densa.attention.flex import build_block_mask, flex_attention
from densa.attention.reference import dense_mask, reference_attention

__all__ = [
    "BACKENDS",
    "blocksparse_attention",
    "build_block_mask",
    "choose_backend",
    "dense_mask",
    "density_attention",
    "flex_attention",
    "reference_attention",
]
