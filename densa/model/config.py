"""Model configuration: a typed, validated dataclass with named presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from densa.config import DictConfig
from densa.density.plan import PlanConfig

ATTENTION_KINDS = ("dense", "sliding", "density")


@dataclass(frozen=True)
class ModelConfig(DictConfig):
    """A Llama-style decoder: RMSNorm, RoPE, SwiGLU, grouped-query attention.

    `attention` picks the pattern: "dense" (causal SDPA), "sliding" (a fixed
    window of `window` tokens) or "density" (the block plan built from token
    densities with `plan`). `backend` forces an attention backend for the
    sparse patterns ("auto" picks one from the device and whether gradients
    are needed).
    """

    vocab_size: int = 4096
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int = 4
    ffn_dim: int = 688
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    attention: str = "density"
    window: int = 128
    backend: str = "auto"
    plan: PlanConfig = field(default_factory=PlanConfig)

    def __post_init__(self) -> None:
        positive = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len", "window")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} is invalid; use a positive integer")
        if self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}; change one of them")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}; "
                "grouped-query attention needs whole groups"
            )
        if (self.dim // self.n_heads) % 2:
            raise ValueError(f"head dim {self.dim // self.n_heads} is odd; RoPE needs an even head dim")
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"attention={self.attention!r} is invalid; choose one of {ATTENTION_KINDS}")
        if self.rope_theta <= 0 or self.norm_eps <= 0:
            raise ValueError("rope_theta and norm_eps must be positive")
        if isinstance(self.plan, dict):
            object.__setattr__(self, "plan", PlanConfig(**_tuples(self.plan)))

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads



def _tuples(values: dict) -> dict:
    # JSON turns tuples into lists; PlanConfig's window ranges are tuples.
    return {key: tuple(value) if isinstance(value, list) else value for key, value in values.items()}


def tiny(vocab_size: int = 4096, **changes) -> ModelConfig:
    """About 3M parameters with a 4K vocabulary: trains in CPU minutes."""
    sizes = dict(dim=192, n_layers=4, n_heads=6, n_kv_heads=2, ffn_dim=512, max_seq_len=2048)
    return ModelConfig(vocab_size=vocab_size, **{**sizes, **changes})


def small(vocab_size: int = 32000, **changes) -> ModelConfig:
    """About 56M parameters with a 32K vocabulary: a single-GPU research model."""
    sizes = dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=4, ffn_dim=1408, max_seq_len=16384)
    return ModelConfig(vocab_size=vocab_size, **{**sizes, **changes})


def base(vocab_size: int = 32000, **changes) -> ModelConfig:
    """About 0.85B parameters with a 32K vocabulary: a multi-GPU model for the parallel engine."""
    sizes = dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=5632, max_seq_len=16384)
    return ModelConfig(vocab_size=vocab_size, **{**sizes, **changes})


PRESETS = {"tiny": tiny, "small": small, "base": base}


def preset(name: str, **changes) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name](**changes)
