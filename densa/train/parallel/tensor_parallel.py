"""Tensor parallelism for the decoder blocks with DTensor's parallelize_module.

Megatron-style pairing: wq/wk/wv and w1/w3 are split along their output
features (ColwiseParallel), so each rank computes a subset of the heads and of
the SwiGLU hidden units with no communication; wo and w2 are split along their
input features (RowwiseParallel) and all-reduce their partial outputs. Each of
the two sub-layers therefore costs one all-reduce forward (in the row-parallel
output) and one backward (the gradient of the replicated input of the
column-parallel projections). Embeddings, norms and the output head stay
replicated on every tensor-parallel rank.
"""

from __future__ import annotations

import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

BLOCK_PLAN = {
    "attention.wq": ColwiseParallel,
    "attention.wk": ColwiseParallel,
    "attention.wv": ColwiseParallel,
    "attention.wo": RowwiseParallel,
    "feed_forward.w1": ColwiseParallel,
    "feed_forward.w3": ColwiseParallel,
    "feed_forward.w2": RowwiseParallel,
}


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh) -> nn.Module:
    """Shard every block in `model.layers` over `tp_mesh` in place and return the model.

    Gradients flow through both collectives: the row-parallel all-reduce is
    the identity in backward, and the column-parallel input's gradient is
    all-reduced (both done by DTensor).
    """
    tp = tp_mesh.size()
    for name, block in model.layers.items():
        attention = block.attention
        for proj in (attention.wq, attention.wk, attention.wv):
            if proj.out_features % (tp * attention.head_dim):
                raise ValueError(
                    f"layer {name}: {proj.out_features // attention.head_dim} heads do not split over tp={tp}; "
                    "choose tp dividing n_heads and n_kv_heads"
                )
        plan = {path: style() for path, style in BLOCK_PLAN.items()}
        parallelize_module(block, tp_mesh, plan)
    return model
