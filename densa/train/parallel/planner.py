"""Analytic planner: memory, step time, communication share and bubble for each (dp, tp, pp, micro-batch) layout.

Every number is an estimate from closed-form formulas, not a measurement:

- Parameters: 12 L h^2 for the decoder layers plus V h for each of the
  embedding and the output head (Narayanan et al. 2021, "Efficient Large-Scale
  Language Model Training on GPU Clusters Using Megatron-LM").
- Model states: 16 bytes per parameter for mixed-precision Adam (bf16 weights
  and gradients, fp32 master weights and two fp32 moments; Rajbhandari et al.
  2020, "ZeRO"), divided by dp when the data-parallel replicas shard them
  (FSDP / ZeRO-3).
- Activations per layer and micro-batch, in bytes, with tensor parallelism t
  and no sequence parallelism (Korthikanti et al. 2022, "Reducing Activation
  Recomputation in Large Transformer Models"): s b h (10 + 24/t + 5 a s/(h t))
  with no recomputation, s b h (10 + 24/t) with selective recomputation (or
  flash attention, which never stores the a s^2 scores), 2 s b h with full
  recomputation. Under 1F1B the first stage keeps min(m, p) micro-batches in
  flight, times (1 + (p - 1)/(p v)) for v interleaved stages per rank.
- FLOPs per step: 72 B s L h^2 (1 + s/(6h) + V/(12 L h)), or
  96 B s L h^2 (1 + s/(6h) + V/(16 L h)) with full recomputation
  (Narayanan et al. 2021).
- Bubble: (p - 1)/(v m + p - 1) of the pipeline time, which is
  (p - 1)/(m + p - 1) for plain 1F1B.
- Communication, ring all-reduce: each GPU sends and receives 2 (n - 1)/n of
  the message. Tensor parallelism all-reduces the s b h activations twice per
  layer forward and twice backward; FSDP moves 3 (n - 1)/n of the bf16
  parameters per step (all-gather forward and backward, reduce-scatter of
  gradients), DDP 2 (n - 1)/n; pipeline stages send s b h activations forward
  and their gradients back once per micro-batch.

The step time adds compute (stretched by the bubble) and all communication
with no overlap, so it is an upper bound for a well-overlapped run.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

# Bytes per element in bf16 and per parameter of mixed-precision Adam state.
BF16_BYTES = 2
ADAM_STATE_BYTES = 16
GIB = 1024**3


@dataclass(frozen=True)
class GPUSpec:
    """Peak numbers of one accelerator and its links, with where they come from."""

    name: str
    peak_tflops: float  # dense bf16 tensor-core peak
    memory_gib: float
    intra_node_gbps: float  # GB/s one way per GPU over NVLink / NVSwitch
    inter_node_gbps: float  # GB/s one way per GPU over the cluster network
    gpus_per_node: int
    source: str


GPUS = {
    "a100-80g": GPUSpec(
        "NVIDIA A100 80GB SXM", 312.0, 80.0, 300.0, 25.0, 8,
        "NVIDIA A100 datasheet: 312 TFLOPS dense BF16, 80 GB HBM2e, NVLink 600 GB/s (300 GB/s each way); "
        "DGX A100: one 200 Gb/s HDR InfiniBand adapter per GPU (25 GB/s)",
    ),
    "a100-40g": GPUSpec(
        "NVIDIA A100 40GB SXM", 312.0, 40.0, 300.0, 25.0, 8,
        "NVIDIA A100 datasheet: 312 TFLOPS dense BF16, 40 GB HBM2, NVLink 600 GB/s (300 GB/s each way); "
        "DGX A100: one 200 Gb/s HDR InfiniBand adapter per GPU (25 GB/s)",
    ),
    "h100-80g": GPUSpec(
        "NVIDIA H100 80GB SXM", 989.0, 80.0, 450.0, 50.0, 8,
        "NVIDIA H100 datasheet: 989 TFLOPS dense BF16 (1979 with sparsity), 80 GB HBM3, NVLink 900 GB/s "
        "(450 GB/s each way); DGX H100: one 400 Gb/s NDR InfiniBand adapter per GPU (50 GB/s)",
    ),
    "h200": GPUSpec(
        "NVIDIA H200 SXM", 989.0, 141.0, 450.0, 50.0, 8,
        "NVIDIA H200 datasheet: 989 TFLOPS dense BF16 (1979 with sparsity), 141 GB HBM3e, NVLink 900 GB/s "
        "(450 GB/s each way); one 400 Gb/s NDR InfiniBand adapter per GPU (50 GB/s)",
    ),
}

RECOMPUTE_KINDS = ("none", "selective", "full")
SHARDING_KINDS = ("fsdp", "ddp")
MICROBATCH_SIZES = (1, 2, 4, 8)
VIRTUAL_STAGES = (1, 2, 4)


@dataclass(frozen=True)
class PlanRequest:
    """The model, cluster and batch to plan for.

    Leave layers, hidden and heads at 0 to derive a Llama-like shape from
    `params` (hidden a multiple of 1024 near 100 x layers, layers a multiple
    of 8 so that pipelines split evenly, 128-wide heads).
    `efficiency` is the assumed fraction of peak FLOP/s that the matrix
    multiplications reach; it is an input, not a measurement.
    """

    params: float
    gpus: int
    gpu: str = "a100-80g"
    seq: int = 4096
    global_batch: int = 1024
    layers: int = 0
    hidden: int = 0
    heads: int = 0
    vocab: int = 32000
    gpus_per_node: int = 0
    recompute: str = "selective"
    sharding: str = "fsdp"
    efficiency: float = 0.6
    memory_headroom: float = 0.9
    derived_shape: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        if not self.params > 0:
            raise ValueError(f"params={self.params!r} is invalid; give the parameter count, e.g. 70e9")
        for name in ("gpus", "seq", "global_batch", "vocab"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} is invalid; use a positive integer")
        for name in ("layers", "hidden", "heads", "gpus_per_node"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}={value!r} is invalid; use a positive integer, or 0 to derive it")
        if self.gpu not in GPUS:
            raise ValueError(f"gpu={self.gpu!r} is unknown; choose one of {sorted(GPUS)}")
        if self.recompute not in RECOMPUTE_KINDS:
            raise ValueError(f"recompute={self.recompute!r} is invalid; choose one of {RECOMPUTE_KINDS}")
        if self.sharding not in SHARDING_KINDS:
            raise ValueError(f"sharding={self.sharding!r} is invalid; choose one of {SHARDING_KINDS}")
        if not 0 < self.efficiency <= 1:
            raise ValueError(f"efficiency={self.efficiency!r} is invalid; use a fraction of peak in (0, 1]")
        if not 0 < self.memory_headroom <= 1:
            raise ValueError(f"memory_headroom={self.memory_headroom!r} is invalid; use a fraction in (0, 1]")
        if not (self.layers and self.hidden):
            object.__setattr__(self, "derived_shape", True)
            hidden, layers = derive_shape(self.params)
            object.__setattr__(self, "hidden", self.hidden or hidden)
            object.__setattr__(self, "layers", self.layers or layers)
        if not self.heads:
            object.__setattr__(self, "heads", max(1, self.hidden // 128))
        if self.hidden % self.heads:
            raise ValueError(f"hidden={self.hidden} is not divisible by heads={self.heads}; change one of them")
        if not self.gpus_per_node:
            object.__setattr__(self, "gpus_per_node", GPUS[self.gpu].gpus_per_node)

    @property
    def spec(self) -> GPUSpec:
        return GPUS[self.gpu]


def derive_shape(params: float) -> tuple[int, int]:
    """Return (hidden, layers) with 12 L h^2 close to `params` and h near 100 L (a Llama-like aspect ratio)."""
    layers_guess = (params / 1.2e5) ** (1 / 3)
    hidden = max(1024, round(math.sqrt(params / (12 * layers_guess)) / 1024) * 1024)
    layers = max(8, round(params / (12 * hidden**2) / 8) * 8)
    return hidden, layers


@dataclass(frozen=True)
class LayoutEstimate:
    dp: int
    tp: int
    pp: int
    virtual_stages: int
    microbatch_size: int
    microbatches: int
    memory_gib: float
    model_state_gib: float
    activation_gib: float
    fits: bool
    step_s: float
    compute_s: float
    comm_s: float
    comm_fraction: float
    bubble_fraction: float
    mfu: float  # model FLOPs (no recomputation) / (step time x GPUs x peak)
    hfu: float  # the same with the recomputed forward passes counted, as Megatron-LM reports it
    tokens_per_s: float

    @property
    def layout(self) -> str:
        return f"dp{self.dp}-tp{self.tp}-pp{self.pp}"

    def to_dict(self) -> dict:
        values = asdict(self)
        values["layout"] = self.layout
        return values


def ring_allreduce_bytes(message_bytes: float, n: int) -> float:
    """Bytes each rank sends in a ring all-reduce of `message_bytes` over n ranks."""
    return 2 * (n - 1) / n * message_bytes


def bubble_fraction(pp: int, microbatches: int, virtual_stages: int = 1) -> float:
    """Idle share of the pipeline time: (p - 1) / (v m + p - 1)."""
    return (pp - 1) / (virtual_stages * microbatches + pp - 1)


def model_flops(request: PlanRequest, recompute: bool = False) -> float:
    """FLOPs of one training step over the global batch (Narayanan et al. 2021)."""
    B, s, L, h, V = request.global_batch, request.seq, request.layers, request.hidden, request.vocab
    if recompute:
        return 96 * B * s * L * h**2 * (1 + s / (6 * h) + V / (16 * L * h))
    return 72 * B * s * L * h**2 * (1 + s / (6 * h) + V / (12 * L * h))


def estimate(request: PlanRequest, dp: int, tp: int, pp: int, microbatch_size: int,
             virtual_stages: int = 1) -> LayoutEstimate:
    """Estimate one layout; the caller guarantees the degrees divide the request."""
    spec = request.spec
    s, L, h, a, V = request.seq, request.layers, request.hidden, request.heads, request.vocab
    b = microbatch_size
    m = request.global_batch // (dp * b)
    peak = spec.peak_tflops * 1e12

    # Memory of the largest stage: the first holds the embedding, the last the
    # output head, and a single stage holds both.
    layer_params = 12 * h**2
    stage_params = (L // pp) * layer_params + V * h * (2 if pp == 1 else 1)
    params_per_gpu = stage_params / tp
    model_state = ADAM_STATE_BYTES * params_per_gpu
    if request.sharding == "fsdp":
        # Sharded states plus one unsharded layer's bf16 weights and gradients.
        model_state = model_state / dp + 2 * BF16_BYTES * layer_params / tp

    if request.recompute == "full":
        per_layer = 2 * s * b * h
    elif request.recompute == "selective":
        per_layer = s * b * h * (10 + 24 / tp)
    else:
        per_layer = s * b * h * (10 + 24 / tp + 5 * a * s / (h * tp))
    in_flight = min(m, pp)
    interleave = 1 + (pp - 1) / (pp * virtual_stages) if virtual_stages > 1 else 1.0
    logits = 4 * s * b * V / tp  # fp32 logits of one micro-batch on the last stage
    activations = per_layer * (L // pp) * in_flight * interleave + logits
    memory = model_state + activations

    # Compute, stretched by the pipeline bubble.
    flops = model_flops(request, recompute=request.recompute == "full")
    compute = flops / (request.gpus * peak * request.efficiency)
    bubble = bubble_fraction(pp, m, virtual_stages) if pp > 1 else 0.0
    pipeline_compute = compute / (1 - bubble)

    # Communication; a group whose ranks span more GPUs than one node holds
    # uses the inter-node network. Rank order is (pp, dp, tp), tp fastest.
    def bandwidth(span: int) -> float:
        gbps = spec.intra_node_gbps if span <= request.gpus_per_node else spec.inter_node_gbps
        return gbps * 1e9

    activation_bytes = BF16_BYTES * s * b * h
    tp_comm = 0.0
    if tp > 1:
        allreduces = 4 + (2 if request.recompute == "full" else 0)
        tp_comm = (L // pp) * m * allreduces * ring_allreduce_bytes(activation_bytes, tp) / bandwidth(tp)
    pp_comm = 2 * m * virtual_stages * activation_bytes / bandwidth(dp * tp * 2) if pp > 1 else 0.0
    dp_comm = 0.0
    if dp > 1:
        factor = 3 if request.sharding == "fsdp" else 2
        dp_comm = factor * (dp - 1) / dp * BF16_BYTES * params_per_gpu / bandwidth(dp * tp)
    comm = tp_comm + pp_comm + dp_comm

    step = pipeline_compute + comm
    tokens = request.global_batch * s
    return LayoutEstimate(
        dp=dp, tp=tp, pp=pp, virtual_stages=virtual_stages, microbatch_size=b, microbatches=m,
        memory_gib=memory / GIB, model_state_gib=model_state / GIB, activation_gib=activations / GIB,
        fits=memory <= request.memory_headroom * spec.memory_gib * GIB,
        step_s=step, compute_s=pipeline_compute, comm_s=comm, comm_fraction=comm / step,
        bubble_fraction=bubble, mfu=model_flops(request) / (step * request.gpus * peak),
        hfu=flops / (step * request.gpus * peak), tokens_per_s=tokens / step,
    )


def candidate_layouts(request: PlanRequest):
    """Yield (dp, tp, pp, microbatch_size, virtual_stages) for every valid layout.

    Tensor parallelism stays inside one node (its all-reduces are on the
    critical path), pp divides the layers evenly, dp divides the global batch,
    and interleaving needs the micro-batch count to be a multiple of pp.
    """
    for tp in _divisors(request.gpus):
        if tp > request.gpus_per_node or request.heads % tp:
            continue
        for pp in _divisors(request.gpus // tp):
            if request.layers % pp:
                continue
            dp = request.gpus // (tp * pp)
            if request.global_batch % dp:
                continue
            for b in MICROBATCH_SIZES:
                if (request.global_batch // dp) % b:
                    continue
                m = request.global_batch // (dp * b)
                for v in VIRTUAL_STAGES if pp > 1 else (1,):
                    if v > 1 and (m % pp or request.layers % (pp * v)):
                        continue
                    yield dp, tp, pp, b, v


def plan(request: PlanRequest) -> list[LayoutEstimate]:
    """Estimate every valid layout, ranked: layouts that fit in memory first, then by step time."""
    estimates = [estimate(request, *candidate) for candidate in candidate_layouts(request)]
    return sorted(estimates, key=lambda e: (not e.fits, e.step_s, e.memory_gib))


def assumptions(request: PlanRequest) -> dict:
    """The hardware numbers and modelling choices behind an estimate, for printing next to it."""
    spec = request.spec
    return {
        "gpu": spec.name,
        "peak_tflops_bf16": spec.peak_tflops,
        "memory_gib": spec.memory_gib,
        "intra_node_gbps": spec.intra_node_gbps,
        "inter_node_gbps": spec.inter_node_gbps,
        "gpus_per_node": request.gpus_per_node,
        "hardware_source": spec.source,
        "efficiency": request.efficiency,
        "memory_headroom": request.memory_headroom,
        "recompute": request.recompute,
        "sharding": request.sharding,
        "overlap": "none: step time adds compute and communication (an upper bound)",
    }


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
