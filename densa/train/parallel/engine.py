"""The 3-D parallel training engine: one optimizer step over a global batch on a (pp, dp, tp) mesh.

Every rank builds the same full model from the same seed, keeps its pipeline
stages, shards them with tensor parallelism (DTensor) and data parallelism
(FSDP2), and runs forward and backward either directly (pp = 1) or through a
pipelining schedule (1F1B or interleaved 1F1B).

Density attention needs the token densities of each batch next to its token
ids. Every rank reads the same global batch, so each one slices its replica's
rows of both and passes the densities to every local stage: directly without
pipelining, and as a keyword argument of the schedule's step() with it.
torch.distributed.pipelining splits keyword arguments into micro-batches like
the inputs and hands them to every stage, not only the first, so each stage
builds the same block plans from the same rows (plans are deterministic
functions of the densities, which keeps tensor-parallel ranks in step).

The loss of every micro-batch is its summed token cross-entropy divided by
the number of target tokens in the whole global batch (all-reduced over the
data-parallel group), and replicas sum their gradients. The gradient is
therefore exactly that of the mean loss over the global batch, whatever share
of the batch each replica processes.

Legend: B batch rows, T tokens, V vocabulary, m micro-batches, S stages.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.pipelining import PipelineStage
from torch.distributed.tensor import DTensor

from densa.model.config import ModelConfig
from densa.model.llama import Transformer
from densa.train.parallel.balancer import LoadBalancer
from densa.train.parallel.data_parallel import apply_fsdp
from densa.train.parallel.layout import ParallelLayout
from densa.train.parallel.pipeline import (
    SCHEDULES,
    StageTimer,
    build_schedule,
    build_stage_module,
    costs_by_params,
    costs_by_time,
    emulate_device_time,
    partition,
    schedule_bubble,
    stage_ids_for_rank,
    valid_microbatches,
)
from densa.train.parallel.tensor_parallel import apply_tensor_parallel
from densa.train.trainer import DTYPES

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
STAGE_BALANCE = ("params", "time")


@dataclass
class EngineConfig:
    """Parallel degrees, schedule and optimizer settings of one training run.

    The global batch is dp x microbatches x microbatch_size rows of seq_len + 1
    tokens. Without pipelining a replica runs its rows as one forward pass and
    `microbatches` only sizes the batch. `slowdown` > 1 makes the ranks of
    data-parallel replica `slow_replica` emulate a device that many times
    slower: after each block's forward and backward, with or without
    pipelining, they wait (slowdown - 1) times the time that work just took.
    Measuring the work as it runs keeps the factor right when processes share
    cores. It is an injected fault for the load-balancing benchmark.

    `emulated_device_s` > 0 turns on an emulated accelerator for benchmarks
    on machines with fewer cores than processes: every block's forward then
    also waits emulated_device_s per batch row, and its backward twice that
    (times `slowdown` on the slow replica). The real CPU work still runs, as
    the host's share of the step, but is not slowed. A wait occupies no core,
    as a kernel running on a GPU occupies none, so eight emulated stages run
    side by side on two cores.

    `grad_clip` is the maximum global gradient norm (0 turns clipping off),
    the same rule as torch.nn.utils.clip_grad_norm_ on the whole model.

    `dtype` "bf16" runs forward passes under torch.autocast with bfloat16, as
    the single-process trainer does. Parameters, gradients, optimizer state
    and the loss stay fp32, and so do the activations that pipeline stages
    exchange, because each block adds its bf16 output to the fp32 residual.
    """

    dp: int = 1
    tp: int = 1
    pp: int = 1
    microbatches: int = 0
    microbatch_size: int = 1
    schedule: str = "1f1b"
    virtual_stages: int = 0
    stage_balance: str = "params"
    seq_len: int = 64
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    warmup_steps: int = 0
    max_steps: int = 100
    seed: int = 0
    balance_load: bool = False
    target_utilisation: float = 0.9
    slowdown: float = 1.0
    slow_replica: int = 0
    grad_clip: float = 1.0
    dtype: str = "fp32"
    emulated_device_s: float = 0.0

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r} is invalid; choose one of {SCHEDULES}")
        if self.stage_balance not in STAGE_BALANCE:
            raise ValueError(f"stage_balance={self.stage_balance!r} is invalid; choose one of {STAGE_BALANCE}")
        if self.virtual_stages == 0:
            self.virtual_stages = 2 if self.schedule == "interleaved" else 1
        if self.schedule == "1f1b" and self.virtual_stages != 1:
            raise ValueError("schedule='1f1b' runs one stage per rank; set virtual_stages=1 or use 'interleaved'")
        if self.microbatches == 0:
            # Enough micro-batches for a small bubble: (p - 1)/(m + p - 1) <= 20% at m = 4p.
            self.microbatches = 4 * self.pp if self.pp > 1 else 1
        for name in ("microbatches", "microbatch_size", "seq_len", "max_steps", "virtual_stages"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} is invalid; use a positive integer")
        if self.pp > 1 and not valid_microbatches(self.microbatches, self.pp, self.schedule):
            raise ValueError(
                f"microbatches={self.microbatches} does not fit the interleaved schedule with pp={self.pp}; "
                f"use a multiple of {self.pp}"
            )
        if self.balance_load and self.pp > 1 and self.schedule == "interleaved":
            # NOTE: the interleaved schedule accepts only some micro-batch
            # counts, so the balancer's shares could be rejected mid-run.
            raise ValueError("balance_load works with schedule='1f1b'; the interleaved schedule restricts counts")
        if self.slowdown < 1:
            raise ValueError(f"slowdown={self.slowdown} is invalid; use 1 (off) or more")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is invalid; choose one of {sorted(DTYPES)}")
        if not 0 <= self.emulated_device_s < math.inf:
            raise ValueError(f"emulated_device_s={self.emulated_device_s} is invalid; use 0 (off) or seconds per row")
        if not isinstance(self.grad_clip, (int, float)) or not 0 <= self.grad_clip < math.inf:
            raise ValueError(f"grad_clip={self.grad_clip!r} is invalid; use 0 (off) or a positive maximum gradient norm")

    @property
    def layout(self) -> ParallelLayout:
        return ParallelLayout(dp=self.dp, tp=self.tp, pp=self.pp)

    @property
    def global_batch(self) -> int:
        return self.dp * self.microbatches * self.microbatch_size


@dataclass
class StepStats:
    """Measurements of one step: loss, grad norm and split are the same on every rank, the times are this rank's.

    `grad_norm` is the global gradient norm before clipping.
    """

    step: int
    loss: float
    step_s: float
    compute_s: float
    utilisation: float
    split: list[int] = field(default_factory=list)
    busy_s: float = 0.0
    grad_norm: float = 0.0


def lr_lambda(config: EngineConfig):
    """Linear warm-up, then cosine decay to min_lr_ratio of the peak at max_steps."""

    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = min(1.0, (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps))
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


class ParallelEngine:
    """This rank's share of a parallel training run: stage modules, optimizers, schedules and load balancer."""

    def __init__(self, model_config: ModelConfig, config: EngineConfig, device: torch.device | None = None):
        self.model_config = model_config
        self.config = config
        self.layout = ParallelLayout(dp=config.dp, tp=config.tp, pp=config.pp, world_size=dist.get_world_size())
        self.layout.check_model(model_config, config.virtual_stages)
        if device is None and torch.cuda.is_available():
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device or torch.device("cpu")
        self.mesh = self.layout.build_mesh(self.device.type)
        self.rank = dist.get_rank()
        coords = self.layout.coordinates(self.rank)
        self.pp_rank, self.dp_rank, self.tp_rank = coords["pp"], coords["dp"], coords["tp"]
        self.step_count = 0

        torch.manual_seed(config.seed)
        full = Transformer(model_config).to(self.device)
        self.n_stages = config.pp * config.virtual_stages
        self.layer_split = self._split_layers(full)
        self.stage_ids = stage_ids_for_rank(self.pp_rank, config.pp, config.virtual_stages)
        self.modules = [
            build_stage_module(full, self.layer_split[s], s == 0, s == self.n_stages - 1) for s in self.stage_ids
        ]
        del full
        slow = config.slowdown > 1 and self.dp_rank == config.slow_replica
        self.slowdown = config.slowdown if slow else 1.0
        for module in self.modules:
            if self.layout.tp_enabled:
                apply_tensor_parallel(module, self.mesh["tp"])
            if self.layout.dp_enabled:
                apply_fsdp(module, self.mesh["dp"], reshard_after_forward=not self.layout.pp_enabled)

        self.optimizers = [
            torch.optim.AdamW(m.parameters(), lr=config.lr, betas=(0.9, 0.95), weight_decay=config.weight_decay)
            for m in self.modules
        ]
        self.schedulers = [torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(config)) for opt in self.optimizers]

        if config.dtype != "fp32":
            for module in self.modules:
                # Wrapping forward itself covers every pipeline chunk and leaves backward to autograd.
                module.forward = torch.autocast(self.device.type, dtype=DTYPES[config.dtype])(module.forward)
        self.timer = StageTimer()
        for module in self.modules:
            # With pipelining the StageTimer counts busy time per chunk instead.
            self._instrument_blocks(module, count_busy=not self.layout.pp_enabled)
        self.stages: list[PipelineStage] = []
        self._schedules: dict[int, object] = {}
        if self.layout.pp_enabled:
            pp_group = self.mesh["pp"].get_group()
            for module, stage_id in zip(self.modules, self.stage_ids):
                stage = PipelineStage(module, stage_id, self.n_stages, self.device, group=pp_group)
                self.timer.wrap(stage)
                self.stages.append(stage)

        units = config.microbatches * (1 if self.layout.pp_enabled else config.microbatch_size)
        self.balancer = LoadBalancer(total_units=units * config.dp, n_workers=config.dp,
                                     target=config.target_utilisation)
        self._global_tokens = 1
        logger.info("rank %d: layout %s, stages %s with layers %s", self.rank, self.layout.name, self.stage_ids,
                    [self.layer_split[s] for s in self.stage_ids])

    # -- construction helpers -------------------------------------------------

    def _split_layers(self, full: Transformer) -> list[list[int]]:
        if self.config.stage_balance == "params":
            costs, first, last = costs_by_params(full)
        else:
            generator = torch.Generator().manual_seed(self.config.seed)
            rows = self.config.microbatch_size
            sample = torch.randint(0, self.model_config.vocab_size, (rows, self.config.seq_len), generator=generator)
            density = self._sample_density(rows, generator)
            costs, first, last = costs_by_time(full, sample.to(self.device), density=density)
            # Timings differ between ranks, so every rank uses rank 0's and all cut alike.
            shared = torch.tensor(costs + [first, last], dtype=torch.float64, device=self.device)
            dist.broadcast(shared, src=0)
            values = shared.tolist()
            costs, first, last = values[:-2], values[-2], values[-1]
        return partition(costs, self.n_stages, first, last)

    def _sample_density(self, rows: int, generator: torch.Generator) -> torch.Tensor | None:
        """Return seeded densities [rows, T] for timing density attention before training, or None for other patterns.

        NOTE: uniform random densities stand in for real text, whose plans may
        be sparser or denser, so density-attention timings are estimates.
        """
        if self.model_config.attention != "density":
            return None
        return torch.rand(rows, self.config.seq_len, generator=generator).to(self.device)

    def _instrument_blocks(self, module: nn.Module, count_busy: bool) -> None:
        """Add the emulated device's time to each block's forward and backward, and optionally time the blocks.

        FSDP gathers a block's parameters and reduces its gradients in hooks
        around the block. These hooks are registered after FSDP's, so the
        windows exclude those collectives, and with them the waits for slower
        replicas. A real slow device is slow inside each block, which is why
        the emulated extra time goes there too rather than once per step.

        The backward window of a block opens when the gradient of its output
        arrives and closes when the gradient of its input is ready. The input
        is a fresh view of the previous block's output, so the hook that closes
        this window runs before the hook on that output opens the previous
        block's window, and the windows do not overlap.
        """
        timer = self.timer
        slowdown = self.slowdown
        device_s = self.config.emulated_device_s
        forward_start: dict[int, float] = {}
        backward_start: dict[int, float] = {}

        def wait(start: float, rows: int, backward: bool) -> None:
            if device_s > 0:
                emulate_device_time(slowdown * device_s * rows * (2 if backward else 1))
            else:
                emulate_device_time((slowdown - 1) * (time.perf_counter() - start))
            if count_busy:
                timer.busy_s += time.perf_counter() - start

        def before_forward(block, args):
            forward_start[id(block)] = time.perf_counter()
            x = args[0]
            if not x.requires_grad:
                return None
            x = x.view_as(x)
            rows = x.shape[0]
            x.register_hook(lambda grad: wait(backward_start[id(block)], rows, backward=True))
            return (x, *args[1:])

        def after_forward(block, args, output):
            wait(forward_start[id(block)], output.shape[0], backward=False)
            if output.requires_grad:
                output.register_hook(lambda grad: backward_start.__setitem__(id(block), time.perf_counter()))

        for block in module.layers.values():
            block.register_forward_pre_hook(before_forward)
            block.register_forward_hook(after_forward)

    def _schedule(self, n_microbatches: int):
        if n_microbatches not in self._schedules:
            self._schedules[n_microbatches] = build_schedule(self.stages, n_microbatches, self._loss_fn,
                                                             self.config.schedule)
        return self._schedules[n_microbatches]

    def _loss_fn(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # Summed, then divided by the global token count: replicas' gradients add up to the mean loss's.
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                               reduction="sum")
        return loss / self._global_tokens

    # -- properties -------------------------------------------------------------

    @property
    def has_first_stage(self) -> bool:
        return 0 in self.stage_ids

    @property
    def has_last_stage(self) -> bool:
        return self.n_stages - 1 in self.stage_ids

    def local_rows(self) -> tuple[int, int]:
        """First row and row count of this replica's share of the global batch."""
        unit = self.config.microbatch_size if self.layout.pp_enabled else 1
        return self.balancer.offsets()[self.dp_rank] * unit, self.balancer.split[self.dp_rank] * unit

    # -- one step ---------------------------------------------------------------

    def forward_backward(self, batch: torch.Tensor,
                         density: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
        """Accumulate gradients of the mean token loss of the global batch [B, T + 1] (the same on every rank).

        `density` [B, T + 1] contains the densities of the batch's tokens, as
        PackedDataset stores them. Density attention requires it and the other
        patterns ignore it. Returns this rank's part of the loss (zero on
        pipeline ranks without the last stage) and its compute seconds:
        wall-clock time inside the decoder blocks (or pipeline chunks) in
        forward and backward, without collectives, the optimizer or waits for
        other replicas.
        """
        config = self.config
        if batch.shape[0] != config.global_batch:
            raise ValueError(f"batch has {batch.shape[0]} rows but the global batch is {config.global_batch}; "
                             "pass dp x microbatches x microbatch_size rows")
        self._check_density(batch, density)
        start, count = self.local_rows()
        rows = batch[start : start + count].to(self.device)
        inputs, targets = rows[:, :-1], rows[:, 1:]  # [b, T] each
        if density is not None:
            # The density of each input token: the last token is only a target.
            density = density[start : start + count, :-1].to(self.device)  # [b, T]

        # Count target tokens over the whole global batch. All ranks of a replica read the same rows.
        tokens = torch.tensor([(targets != IGNORE_INDEX).sum().item()], dtype=torch.float64, device=self.device)
        if self.layout.dp_enabled:
            dist.all_reduce(tokens, group=self.mesh["dp"].get_group())
        self._global_tokens = tokens.item()

        self.timer.reset()
        if self.layout.pp_enabled:
            loss = self._pipeline_forward_backward(inputs, targets, density, count // config.microbatch_size)
            return loss, self.timer.busy_s
        logits = self.modules[0](inputs, density=density)
        loss = self._loss_fn(logits, targets)
        loss.backward()
        return loss.detach(), self.timer.busy_s

    def _check_density(self, batch: torch.Tensor, density: torch.Tensor | None) -> None:
        if density is None:
            if self.model_config.attention == "density":
                raise ValueError("attention='density' needs token densities; pass density [B, T + 1] "
                                 "with the batch, as PackedDataset.density stores them")
            return
        if tuple(density.shape) != tuple(batch.shape):
            raise ValueError(f"density has shape {tuple(density.shape)} but the batch is {tuple(batch.shape)}; "
                             "pass one density per token of the batch")
        if not density.is_floating_point():
            raise ValueError(f"density has dtype {density.dtype}; pass float densities in [0, 1]")

    def clip_gradients(self) -> float:
        """Scale all gradients to a global norm of at most grad_clip (when > 0); return the norm before clipping.

        The norm is the 2-norm over every parameter of the model, as
        torch.nn.utils.clip_grad_norm_ computes it on one process. It takes
        two kinds of collectives, and no gradient flows through either because
        they run after backward. First, get_total_norm on the DTensor
        gradients of one (mesh, placements) group returns a partial norm,
        which full_tensor() all-reduces over the dp and tp ranks that shard
        the group. Plain tensors are replicated over tp and unsharded without
        dp, so they need no reduction. Second, the squared norms of this
        rank's stages are all-reduced over the pp group. Each stage lives on
        exactly one pipeline rank, so every rank ends with the same global norm.
        """
        groups: dict[object, list[torch.Tensor]] = {}
        parameters = [p for module in self.modules for p in module.parameters() if p.grad is not None]
        for param in parameters:
            grad = param.grad
            key = (grad.device_mesh, grad.placements) if isinstance(grad, DTensor) else None
            groups.setdefault(key, []).append(grad)

        squared = torch.zeros((), dtype=torch.float32, device=self.device)
        for grads in groups.values():
            norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
            if isinstance(norm, DTensor):
                norm = norm.full_tensor()
            squared = squared + norm.to(squared.device).pow(2)
        if self.layout.pp_enabled:
            dist.all_reduce(squared, group=self.mesh["pp"].get_group())
        total_norm = squared.sqrt()

        if self.config.grad_clip > 0:
            # The coefficient of clip_grad_norm_, max_norm / (norm + 1e-6) capped
            # at 1, in fp32 as it computes it. It is applied as a Python number
            # because torch's in-place foreach multiply rejects a plain-tensor
            # factor for DTensor gradients (torch 2.13).
            coefficient = (self.config.grad_clip / (total_norm + 1e-6)).clamp(max=1.0).item()
            for param in parameters:
                param.grad.mul_(coefficient)
        return total_norm.item()

    def optimizer_step(self) -> None:
        """Step every stage's optimizer and scheduler and clear the gradients; clip_gradients() comes first."""
        for optimizer, scheduler in zip(self.optimizers, self.schedulers):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()

    def train_step(self, batch: torch.Tensor, density: torch.Tensor | None = None) -> StepStats:
        """Run forward and backward, clip the gradients and step the optimizers, then rebalance if enabled.

        `density` [B, T + 1] contains the token densities (see forward_backward).
        """
        start_wall = time.perf_counter()
        split = list(self.balancer.split)
        loss, compute = self.forward_backward(batch, density)
        grad_norm = self.clip_gradients()
        self.optimizer_step()
        loss_value = self.global_loss(loss)
        step_s = time.perf_counter() - start_wall

        utilisation = compute / step_s
        if self.config.balance_load:
            # The data-parallel phase lasts until the slowest replica finishes its
            # forward and backward; the optimizer and fixed costs do not depend on
            # the shares, so the balancer's step time leaves them out.
            per_replica = self._replica_compute(compute)
            slowest = max(per_replica)
            self.balancer.update([c / slowest for c in per_replica])
        self.step_count += 1
        return StepStats(self.step_count, loss_value, step_s, compute, utilisation, split, self.timer.busy_s,
                         grad_norm)

    def _pipeline_forward_backward(self, inputs, targets, density, n_microbatches: int) -> torch.Tensor:
        schedule = self._schedule(n_microbatches)
        args = (inputs,) if self.has_first_stage else ()
        # Positional inputs reach the first stage only, while keyword inputs are
        # split into micro-batches along dim 0 and reach every stage's forward.
        kwargs = {} if density is None else {"density": density}
        losses: list[torch.Tensor] = []
        if self.has_last_stage:
            schedule.step(*args, target=targets, losses=losses, return_outputs=False, **kwargs)
            return torch.stack(losses).sum().detach()
        schedule.step(*args, return_outputs=False, **kwargs)
        return torch.zeros((), device=self.device)

    def global_loss(self, loss: torch.Tensor) -> float:
        """Mean token loss of the global batch, known on every rank."""
        loss = loss.detach().to(torch.float64).reshape(1)
        if self.layout.dp_enabled:
            dist.all_reduce(loss, group=self.mesh["dp"].get_group())
        if self.layout.pp_enabled:
            dist.broadcast(loss, group=self.mesh["pp"].get_group(), group_src=self.layout.pp - 1)
        return loss.item()

    def _replica_compute(self, compute: float) -> list[float]:
        """All-gather every rank's compute seconds and average them per data-parallel replica."""
        # On the engine's device: NCCL process groups carry CUDA tensors only.
        values = [torch.zeros(1, dtype=torch.float64, device=self.device) for _ in range(dist.get_world_size())]
        dist.all_gather(values, torch.tensor([compute], dtype=torch.float64, device=self.device))
        per_replica = [[] for _ in range(self.layout.dp)]
        for rank, value in enumerate(values):
            per_replica[self.layout.coordinates(rank)["dp"]].append(value.item())
        return [sum(v) / len(v) for v in per_replica]

    # -- pipeline bubble --------------------------------------------------------

    def schedule_bubble(self) -> float:
        """Idle fraction of the last step's executed action order, gathered over the pipeline group."""
        if not self.layout.pp_enabled:
            return 0.0
        gathered: list = [None] * self.layout.pp
        dist.all_gather_object(gathered, list(self.timer.actions), group=self.mesh["pp"].get_group())
        return schedule_bubble(dict(enumerate(gathered)))

    def measured_bubble(self, stats: StepStats) -> float:
        """1 - (compute-busy seconds / step seconds), averaged over the pipeline ranks of this replica."""
        if not self.layout.pp_enabled:
            return 0.0
        busy = torch.tensor([stats.busy_s / stats.step_s], dtype=torch.float64, device=self.device)
        dist.all_reduce(busy, group=self.mesh["pp"].get_group())
        return 1.0 - busy.item() / self.layout.pp

    # -- parameters, for tests and snapshots ------------------------------------

    def named_parameters(self):
        """(name, parameter) of every stage module on this rank, with the original model's names."""
        for module in self.modules:
            yield from module.named_parameters()

    def full_parameters(self) -> dict[str, torch.Tensor]:
        """Unsharded copies of this rank's parameters (a collective over the dp and tp groups)."""
        with _quiet_redistribute():
            return {name: _full(p).detach().clone() for name, p in self.named_parameters()}

    def full_gradients(self) -> dict[str, torch.Tensor]:
        with _quiet_redistribute():
            return {name: _full(p.grad).detach().clone() for name, p in self.named_parameters()
                    if p.grad is not None}


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


@contextlib.contextmanager
def _quiet_redistribute():
    """Silence DTensor's warning that FSDP + TP parameters, strided shards over dp and tp, gather in two steps.

    Whole parameters are gathered only for tests and checksums, so that performance warning is noise there.
    """
    redistribute_logger = logging.getLogger("torch.distributed.tensor._redistribute")
    level = redistribute_logger.level
    redistribute_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        redistribute_logger.setLevel(level)


def reference_loss(model: nn.Module, batch: torch.Tensor, density: torch.Tensor | None = None) -> torch.Tensor:
    """Mean token cross-entropy of a whole model on batch [B, T + 1], for comparison with the engine.

    `density` [B, T + 1] contains the token densities that density attention needs.
    """
    inputs, targets = batch[:, :-1], batch[:, 1:]
    logits = model(inputs, density=None if density is None else density[:, :-1])  # [B, T, V]
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)
