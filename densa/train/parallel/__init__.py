"""3-D hybrid-parallel training on torch.distributed: data (FSDP2), tensor (DTensor) and pipeline parallelism.

layout.py owns the degrees and the device mesh, planner.py estimates layouts
analytically; the other modules are imported on demand because they pull in
torch.distributed's heavier parts.
"""

from densa.train.parallel.layout import ParallelLayout

__all__ = ["ParallelLayout"]
