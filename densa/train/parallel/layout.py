"""The parallel layout: data x tensor x pipeline degrees and the named device mesh.

Ranks are laid out row-major over the mesh dimensions ("pp", "dp", "tp"), so
tensor-parallel peers are adjacent ranks (the fastest links on one machine)
and pipeline stages are the furthest apart:

    rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from densa.model.config import ModelConfig

logger = logging.getLogger(__name__)

MESH_DIM_NAMES = ("pp", "dp", "tp")


@dataclass(frozen=True)
class ParallelLayout:
    """Degrees of data (dp), tensor (tp) and pipeline (pp) parallelism.

    `world_size` defaults to dp * tp * pp; when given, the product must match
    it exactly, because every rank holds exactly one (pp, dp, tp) coordinate.
    """

    dp: int = 1
    tp: int = 1
    pp: int = 1
    world_size: int = 0

    def __post_init__(self) -> None:
        for name in ("dp", "tp", "pp"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} is invalid; use a positive integer degree")
        product = self.dp * self.tp * self.pp
        if self.world_size == 0:
            object.__setattr__(self, "world_size", product)
        elif self.world_size != product:
            raise ValueError(
                f"dp x tp x pp = {self.dp} x {self.tp} x {self.pp} = {product} does not match the world size "
                f"{self.world_size}; choose degrees whose product is {self.world_size}"
            )

    @classmethod
    def infer(cls, world_size: int, dp: int | None = None, tp: int = 1, pp: int = 1) -> "ParallelLayout":
        """Build a layout, filling in dp as world_size / (tp * pp) when it is not given."""
        if dp is None:
            if world_size % (tp * pp):
                raise ValueError(
                    f"world size {world_size} is not divisible by tp x pp = {tp * pp}; "
                    "pick tp and pp whose product divides the number of processes"
                )
            dp = world_size // (tp * pp)
        return cls(dp=dp, tp=tp, pp=pp, world_size=world_size)

    @property
    def name(self) -> str:
        """A short label such as "dp2-tp2-pp2" for logs and benchmark records."""
        return f"dp{self.dp}-tp{self.tp}-pp{self.pp}"

    @property
    def dp_enabled(self) -> bool:
        return self.dp > 1

    @property
    def tp_enabled(self) -> bool:
        return self.tp > 1

    @property
    def pp_enabled(self) -> bool:
        return self.pp > 1

    def enabled(self) -> list[str]:
        """Names of the parallelisms in use, for example ["dp", "tp"]."""
        return [name for name in ("dp", "tp", "pp") if getattr(self, f"{name}_enabled")]

    def coordinates(self, rank: int) -> dict[str, int]:
        """Return the (pp, dp, tp) coordinates of a global rank."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside the world of {self.world_size} processes")
        return {
            "pp": rank // (self.dp * self.tp),
            "dp": rank // self.tp % self.dp,
            "tp": rank % self.tp,
        }

    def check_model(self, config: ModelConfig, virtual_stages: int = 1) -> None:
        """Raise ValueError when the model cannot be split this way."""
        if self.tp_enabled:
            for name in ("n_heads", "n_kv_heads", "ffn_dim"):
                value = getattr(config, name)
                if value % self.tp:
                    raise ValueError(
                        f"tensor parallelism tp={self.tp} needs {name}={value} divisible by {self.tp}; "
                        f"choose tp dividing {name} or change the model"
                    )
        stages = self.pp * virtual_stages
        if stages > config.n_layers:
            raise ValueError(
                f"pp={self.pp} with {virtual_stages} stage(s) per rank needs at least {stages} layers, "
                f"but the model has n_layers={config.n_layers}; lower pp or the stages per rank"
            )

    def build_mesh(self, device_type: str | None = None) -> DeviceMesh:
        """Create the 3-D DeviceMesh ("pp", "dp", "tp"); the process group must already be initialised."""
        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised; call init_process_group (torchrun does) first")
        actual = dist.get_world_size()
        if actual != self.world_size:
            raise ValueError(
                f"layout {self.name} needs {self.world_size} processes but the job has {actual}; "
                "start it with --nproc equal to dp x tp x pp"
            )
        device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
        mesh = init_device_mesh(device_type, (self.pp, self.dp, self.tp), mesh_dim_names=MESH_DIM_NAMES)
        if self.dp > 1 and self.tp > 1:
            # A flattened "dp_tp" dimension lets DTensor reduce a tensor that is partial or sharded over
            # both (the gradient norm, FSDP + TP parameters) with one collective instead of two in a row.
            # NOTE: DeviceMesh._flatten is private in torch 2.13; torch's own DTensor warning recommends it.
            mesh["dp", "tp"]._flatten("dp_tp")
        logger.info("device mesh %s on %s: %s enabled", self.name, device_type, ", ".join(self.enabled()) or "none")
        return mesh
