"""Parallel engine against a single-process run: loss and gradients for each layout (gloo, real processes).

Each test spawns real processes on 127.0.0.1 that run several layouts in one
process group, so the suite pays the start-up cost once per world size.
"""

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from densa.model.config import ModelConfig
from densa.model.llama import Transformer
from densa.train.parallel.engine import EngineConfig, ParallelEngine, lr_lambda, reference_loss
from densa.train.parallel.layout import ParallelLayout

# fp32 on CPU: sharded and pipelined runs reorder sums, nothing else. Under
# bf16 autocast (7 stored mantissa bits) they also round different partial
# products and sums, mostly in backward. The reference runs under autocast too.
TOLERANCE = {
    "fp32": {"loss": 1e-5, "grad": (2e-6, 1e-4), "norm": 1e-5, "param": (1e-5, 1e-4)},
    "bf16": {"loss": 2e-4, "grad": (2e-3, 5e-2), "norm": 1e-2, "param": (2e-3, 1e-2)},
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def model_config(n_kv_heads: int = 4, n_layers: int = 4) -> ModelConfig:
    return ModelConfig(vocab_size=96, dim=64, n_layers=n_layers, n_heads=8, n_kv_heads=n_kv_heads, ffn_dim=128,
                       max_seq_len=64, attention="dense")


def make_batch(rows: int, seq_len: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (rows, seq_len + 1), generator=torch.Generator().manual_seed(seed))


def check_layout(model_cfg: ModelConfig, engine_cfg: EngineConfig, steps: int = 2,
                 split: list[int] | None = None,
                 batches: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> ParallelEngine:
    """Compare loss, gradients and clipping of `steps` optimizer steps with one process on the whole batch.

    `split` fixes the replicas' shares of the global batch (rows, or micro-batches with pipelining).
    `batches` gives (tokens, density) [B, T + 1] per step; without it the tokens are random and
    there are no densities.
    """
    engine = ParallelEngine(model_cfg, engine_cfg)
    if split is not None:
        engine.balancer.set_split(split)
    torch.manual_seed(engine_cfg.seed)
    reference = Transformer(model_cfg)
    optimizer = torch.optim.AdamW(reference.parameters(), lr=engine_cfg.lr, betas=(0.9, 0.95),
                                  weight_decay=engine_cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(engine_cfg))
    reference_params = dict(reference.named_parameters())
    label = engine_cfg.layout.name + f" {engine_cfg.schedule} {engine_cfg.dtype}"
    tol = TOLERANCE[engine_cfg.dtype]
    (atol, rtol), (param_atol, param_rtol) = tol["grad"], tol["param"]

    max_norm = engine_cfg.grad_clip if engine_cfg.grad_clip > 0 else math.inf

    for step in range(steps):
        if batches is None:
            batch = make_batch(engine_cfg.global_batch, engine_cfg.seq_len, model_cfg.vocab_size, seed=step)
            density = None
        else:
            batch, density = batches[step]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=engine_cfg.dtype == "bf16"):
            expected = reference_loss(reference, batch, density)
        expected.backward()

        loss, _ = engine.forward_backward(batch, density)
        loss = engine.global_loss(loss)
        assert abs(loss - expected.item()) < tol["loss"], f"{label} step {step}: loss {loss} != {expected.item()}"
        grads = engine.full_gradients()
        assert grads, f"{label}: rank holds no gradients"
        for name, grad in grads.items():
            torch.testing.assert_close(grad, reference_params[name].grad, atol=atol, rtol=rtol,
                                       msg=lambda m, name=name: f"{label} step {step} grad {name}: {m}")

        expected_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm).item()
        norm = engine.clip_gradients()
        assert norm == pytest.approx(expected_norm, rel=tol["norm"]), f"{label} step {step}: grad norm"
        for name, grad in engine.full_gradients().items():
            torch.testing.assert_close(grad, reference_params[name].grad, atol=atol, rtol=rtol,
                                       msg=lambda m, name=name: f"{label} step {step} clipped grad {name}: {m}")

        engine.optimizer_step()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()

    for name, value in engine.full_parameters().items():
        torch.testing.assert_close(value, reference_params[name].detach(), atol=param_atol, rtol=param_rtol,
                                   msg=lambda m, name=name: f"{label} param {name} after {steps} steps: {m}")
    return engine


def run_world(world_size: int, fn, *args) -> None:
    mp.start_processes(_entry, args=(world_size, free_port(), fn, args), nprocs=world_size, start_method="spawn")


def _entry(rank: int, world_size: int, port: int, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        fn(*args)
    finally:
        dist.barrier()
        dist.destroy_process_group()


def two_way_layouts() -> None:
    cfg = model_config()
    check_layout(cfg, EngineConfig(dp=2, microbatches=2, seq_len=16))
    check_layout(cfg, EngineConfig(tp=2, microbatches=2, seq_len=16))
    engine = check_layout(cfg, EngineConfig(pp=2, microbatches=4, seq_len=16, schedule="1f1b"))
    bubbles = {"1f1b": engine.schedule_bubble()}
    engine = check_layout(cfg, EngineConfig(pp=2, microbatches=4, seq_len=16, schedule="interleaved"))
    bubbles["interleaved"] = engine.schedule_bubble()
    # Replayed from the executed action order: (p - 1)/(v m + p - 1) with p = 2, m = 4, v = 1 or 2.
    assert bubbles["1f1b"] == pytest.approx(1 / 5)
    assert bubbles["interleaved"] == pytest.approx(1 / 9)

    for layout in (dict(dp=2), dict(tp=2), dict(pp=2, microbatches=4), dict(pp=2, schedule="interleaved")):
        engine = check_layout(cfg, EngineConfig(**{"microbatches": 2, **layout, "seq_len": 16, "dtype": "bf16"}))
    check_autocast_is_on(engine)


def check_autocast_is_on(engine: ParallelEngine) -> None:
    """The bf16 engine's loss matches the bf16 reference (checked above) but not the fp32 one."""
    cfg, config = engine.model_config, engine.config
    batch = make_batch(config.global_batch, config.seq_len, cfg.vocab_size, seed=99)
    fp32 = ParallelEngine(cfg, EngineConfig(**{**config.__dict__, "dtype": "fp32"}))
    losses = [e.global_loss(e.forward_backward(batch)[0]) for e in (engine, fp32)]
    assert abs(losses[0] - losses[1]) > 1e-5, f"bf16 loss {losses[0]} equals fp32 loss {losses[1]}"


def check_mesh(layout: ParallelLayout) -> None:
    """Check that each mesh dimension's group contains the ranks that differ only in that coordinate."""
    mesh = layout.build_mesh("cpu")
    rank = dist.get_rank()
    mine = layout.coordinates(rank)
    for dim in ("pp", "dp", "tp"):
        members = dist.get_process_group_ranks(mesh[dim].get_group())
        expected = [r for r in range(layout.world_size)
                    if all(layout.coordinates(r)[d] == mine[d] for d in ("pp", "dp", "tp") if d != dim)]
        assert sorted(members) == expected, f"rank {rank} {dim} group {members} != {expected}"
        assert mesh[dim].get_local_rank() == mine[dim]


def eight_way_layouts() -> None:
    check_mesh(ParallelLayout(dp=2, tp=2, pp=2))
    check_layout(model_config(), EngineConfig(dp=2, tp=2, pp=2, microbatches=4, seq_len=16))
    check_layout(model_config(), EngineConfig(dp=2, tp=2, pp=2, microbatches=4, seq_len=16, dtype="bf16"))
    check_layout(model_config(n_kv_heads=8), EngineConfig(tp=8, microbatches=2, seq_len=16), steps=1)


def test_two_way_layouts_match_single_process():
    run_world(2, two_way_layouts)


@pytest.mark.slow
def test_dp2_tp2_pp2_and_tp8_match_single_process():
    run_world(8, eight_way_layouts)
