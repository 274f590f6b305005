"""Pipeline parallelism with torch.distributed.pipelining: stage split, schedules and the bubble.

The decoder's layers are cut into `pp * virtual_stages` contiguous stages.
Stage s runs on pipeline rank s % pp, so with virtual_stages > 1 each rank
runs several non-adjacent stages (the interleaved "loop" placement that
ScheduleInterleaved1F1B expects). A stage module is a copy of the whole model
with the other stages' layers deleted, and keeps the original parameter names
("layers.5.attention.wq.weight"), which makes checkpoints portable across
layouts.

Legend: S stages, m micro-batches, p pipeline ranks, v stages per rank.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleInterleaved1F1B

logger = logging.getLogger(__name__)

SCHEDULES = ("1f1b", "interleaved")


def partition(costs: list[float], n_stages: int, first_extra: float = 0.0, last_extra: float = 0.0) -> list[list[int]]:
    """Cut layers 0..N-1 into `n_stages` contiguous, non-empty runs minimising the costliest stage.

    `first_extra` and `last_extra` are the costs of the embedding (first
    stage) and of the final norm and output head (last stage). Exact dynamic
    programming over cut points, O(S N^2), which is instant for any real
    layer count.
    """
    n = len(costs)
    if not 1 <= n_stages <= n:
        raise ValueError(f"cannot cut {n} layers into {n_stages} non-empty stages; use between 1 and {n} stages")
    prefix = [0.0]
    for cost in costs:
        prefix.append(prefix[-1] + cost)

    def stage_cost(start: int, end: int, index: int) -> float:
        cost = prefix[end] - prefix[start]
        if index == 0:
            cost += first_extra
        if index == n_stages - 1:
            cost += last_extra
        return cost

    # best[s][j]: the smallest max-stage cost placing layers [0, j) in s stages.
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(n_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(n_stages + 1)]
    best[0][0] = 0.0
    for s in range(1, n_stages + 1):
        for j in range(s, n - (n_stages - s) + 1):
            for i in range(s - 1, j):
                value = max(best[s - 1][i], stage_cost(i, j, s - 1))
                # Ties go to the later cut, which keeps earlier stages light
                # (they also hold activations of more micro-batches).
                if value <= best[s][j]:
                    best[s][j], cut[s][j] = value, i
    bounds, j = [], n
    for s in range(n_stages, 0, -1):
        i = cut[s][j]
        bounds.append(list(range(i, j)))
        j = i
    return bounds[::-1]


def costs_by_params(model: nn.Module) -> tuple[list[float], float, float]:
    """Return per-layer parameter counts and those of the embedding and of the norm plus output head."""
    layers = [float(sum(p.numel() for p in layer.parameters())) for layer in model.layers.values()]
    first = float(sum(p.numel() for p in model.tok_embeddings.parameters()))
    last = float(sum(p.numel() for p in model.norm.parameters()) + sum(p.numel() for p in model.output.parameters()))
    return layers, first, last


def costs_by_time(model: nn.Module, tokens: torch.Tensor, repeats: int = 3,
                  density: torch.Tensor | None = None) -> tuple[list[float], float, float]:
    """Measure forward+backward seconds of each layer, the embedding and the head on sample tokens [B, T].

    `density` [B, T] is required for density attention. Takes the median of
    `repeats` runs after one warm-up run on the local device. Timings differ
    between ranks, so the engine broadcasts rank 0's result and all ranks cut
    identically.
    """
    B, T = tokens.shape
    context = model.attention_context(B, T, density)
    freqs = model.freqs[:T]

    def timed(fn, x):
        samples = []
        for _ in range(repeats + 1):
            x_in = x.detach().requires_grad_(x.is_floating_point())
            start = time.perf_counter()
            out = fn(x_in)
            out.float().pow(2).mean().backward()
            samples.append(time.perf_counter() - start)
        return sorted(samples[1:])[len(samples[1:]) // 2]

    first = timed(model.tok_embeddings, tokens)
    h = model.tok_embeddings(tokens).detach()
    layers = [timed(lambda x, layer=layer: layer(x, freqs, context), h) for layer in model.layers.values()]
    last = timed(lambda x: model.output(model.norm(x)), h)
    model.zero_grad(set_to_none=True)
    return layers, first, last


def stage_ids_for_rank(pp_rank: int, pp: int, virtual_stages: int) -> list[int]:
    """Stages held by one pipeline rank: pp_rank, pp_rank + pp, ... (loop placement)."""
    return [pp_rank + k * pp for k in range(virtual_stages)]


def build_stage_module(model: nn.Module, layer_ids: list[int], first: bool, last: bool) -> nn.Module:
    """Copy `model`, keeping only `layer_ids`, the embedding when first and the norm and head when last.

    NOTE: copies the whole model before pruning, which needs the full model
    in memory on every rank. A very large model would instead be built on the
    meta device and materialised per stage.
    """
    stage = copy.deepcopy(model)
    keep = {str(i) for i in layer_ids}
    for name in list(stage.layers.keys()):
        if name not in keep:
            del stage.layers[name]
    if not first:
        stage.tok_embeddings = None
    if not last:
        stage.norm = None
        stage.output = None
    return stage


@dataclass
class StageTimer:
    """Wall-clock seconds that one rank's stages spend computing (forward and backward) during a step."""

    busy_s: float = 0.0
    actions: list[tuple[str, int, int]] = field(default_factory=list)

    def wrap(self, stage: PipelineStage) -> None:
        """Time the stage's forward_one_chunk and backward_one_chunk, the only places where it computes.

        The emulated slow device waits inside the blocks (see
        ParallelEngine._instrument_blocks), so these windows include its time.
        """
        for method, kind in (("forward_one_chunk", "F"), ("backward_one_chunk", "B")):
            original = getattr(stage, method)
            setattr(stage, method, self._timed(original, kind, stage.stage_index))

    def _timed(self, fn, kind: str, stage_index: int):
        def run(chunk_id, *args, **kwargs):
            self.actions.append((kind, stage_index, chunk_id))
            start = time.perf_counter()
            result = fn(chunk_id, *args, **kwargs)
            self.busy_s += time.perf_counter() - start
            return result

        return run

    def reset(self) -> None:
        self.busy_s = 0.0
        self.actions = []


def emulate_device_time(seconds: float) -> None:
    """Wait `seconds`, as the host waits for work on an emulated device or for the extra time of a slower one.

    A sleep rather than extra work, because an accelerator's kernels do not
    occupy the host CPU. On a CPU-only machine this also keeps the waiting
    process from taking cores from the others.
    """
    if seconds > 0:
        time.sleep(seconds)


def build_schedule(stages: list[PipelineStage], n_microbatches: int, loss_fn, schedule: str):
    """Create the schedule; gradients are not rescaled because the loss is already divided by the token count."""
    if schedule == "1f1b":
        if len(stages) != 1:
            raise ValueError(f"1f1b runs one stage per rank, got {len(stages)}; use schedule='interleaved'")
        return Schedule1F1B(stages[0], n_microbatches, loss_fn=loss_fn, scale_grads=False)
    if schedule == "interleaved":
        return ScheduleInterleaved1F1B(stages, n_microbatches, loss_fn=loss_fn, scale_grads=False)
    raise ValueError(f"schedule={schedule!r} is invalid; choose one of {SCHEDULES}")


def valid_microbatches(n_microbatches: int, pp: int, schedule: str) -> bool:
    """Check whether the schedule accepts this micro-batch count.

    ScheduleInterleaved1F1B runs rounds of min(m, p) micro-batches and needs m
    to be a multiple of the number of rounds, max(1, m // p) (torch 2.13).
    """
    if n_microbatches < 1:
        return False
    if schedule == "interleaved":
        return n_microbatches % max(1, n_microbatches // pp) == 0
    return True


def table_actions(pipeline_order: dict) -> dict[int, list[tuple[str, int, int]]]:
    """Turn a schedule's `pipeline_order` table into (kind, stage, micro-batch) forward and backward actions per rank."""
    return {
        rank: [(a.computation_type.value, a.stage_index, a.microbatch_index)
               for a in acts if a is not None and a.computation_type.value in ("F", "B")]
        for rank, acts in pipeline_order.items()
    }


def schedule_bubble(actions: dict[int, list[tuple[str, int, int]]], forward_cost: float = 1.0,
                    backward_cost: float = 2.0) -> float:
    """Idle fraction of a schedule's action order, replayed with data dependencies.

    `actions` maps each pipeline rank to its ordered ("F" or "B", stage,
    micro-batch) actions, and each rank runs them in order. A forward of
    stage s waits for the forward of stage s - 1 on the same micro-batch. A
    backward waits for the backward of stage s + 1, or on the last stage for
    its own forward. A backward costs twice a forward, as its two matrix products per
    forward product do. The result is the share of rank-time spent idle,
    (p - 1)/(m + p - 1) for 1F1B.

    NOTE: torch 2.13's Schedule1F1B.pipeline_order numbers the last rank's
    forwards from 1 instead of 0, so the engine replays the order its stages
    actually executed (recorded by StageTimer) rather than that table.
    """
    n_stages = 1 + max(stage for acts in actions.values() for _, stage, _ in acts)
    done: dict[tuple[str, int, int], float] = {}
    clock = {rank: 0.0 for rank in actions}
    position = {rank: 0 for rank in actions}
    busy = 0.0
    remaining = sum(len(acts) for acts in actions.values())
    while remaining:
        progressed = False
        for rank, acts in actions.items():
            while position[rank] < len(acts):
                kind, stage, mb = acts[position[rank]]
                if kind == "F":
                    deps = [("F", stage - 1, mb)] if stage > 0 else []
                    cost = forward_cost
                else:
                    deps = [("B", stage + 1, mb)] if stage < n_stages - 1 else [("F", stage, mb)]
                    cost = backward_cost
                if any(dep not in done for dep in deps):
                    break
                start = max([clock[rank]] + [done[dep] for dep in deps])
                clock[rank] = start + cost
                done[(kind, stage, mb)] = clock[rank]
                busy += cost
                position[rank] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            raise RuntimeError("the pipeline action order deadlocks: an action waits on one that never runs")
    makespan = max(clock.values())
    return 1.0 - busy / (makespan * len(actions))
