"""Data parallelism with FSDP2 (fully_shard) over the "dp" mesh dimension.

Each decoder block is its own FSDP unit so that only one block's parameters
are unsharded at a time, and the stage module is the root unit for the
embeddings, final norm and output head. Tensor-parallel DTensor parameters
become 2-D (dp, tp) shards.

Gradients are summed across replicas rather than averaged
(`set_gradient_divide_factor(1.0)`): the loss of every replica is already
divided by the global token count, which makes unequal local batches exact.
Sum-only reductions are forced because gloo has no pre-multiplied sum.
"""

from __future__ import annotations

import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard


def apply_fsdp(model: nn.Module, dp_mesh: DeviceMesh, reshard_after_forward: bool = True) -> nn.Module:
    """Shard `model` (a whole model or a pipeline stage) over `dp_mesh` in place and return it.

    With pipelining, pass reshard_after_forward=False: the parameters then
    stay gathered across a step's micro-batches, so each replica issues the
    same collectives however many micro-batches it runs.
    """
    for block in model.layers.values():
        fully_shard(block, mesh=dp_mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=dp_mesh, reshard_after_forward=reshard_after_forward)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    return model
