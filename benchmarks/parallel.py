"""Benchmark the parallel engine: correctness against one process, pipeline bubble, load balancing, recovery.

Every number comes from real gloo processes on this machine, spawned side by
side in one run:

- layouts: per-step loss against a single-process run of the same model and
  data, and the pipeline bubble twice: replayed from the schedule's executed
  action order, and measured as 1 - busy / step time of the stage ranks;
- balancer: four data-parallel replicas, one slowed 2x by an injected
  wait, with the static even split, the dynamic balancer, and the ideal
  split proportional to each replica's measured speed;
- recovery: a torchrun job with --max-restarts 1 whose worker is killed,
  against the same job uninterrupted.

--bubble runs only pipelines, in two settings:

- cpu: two stages of a wider model with longer micro-batches, computing on
  the CPU. Each micro-batch is compute-bound, so per-micro-batch overhead is
  a small share of the measured bubble. Two stages are the most this 2-core
  machine can run without time-sharing a core.
- emulated: 2, 4 and 8 stages of a 32-block model, as deep as Llama-7B,
  on an emulated accelerator (EngineConfig.emulated_device_s). Each block's
  forward waits 10 ms per micro-batch row and its backward 20 ms. By
  estimate, one Llama-7B layer needs 1.9 TFLOP forward on 4,096 tokens,
  12 ms on an A100 at half its 312 TFLOP/s bf16 peak. The real model still
  computes on the CPU, and the stages exchange real activations and
  gradients over gloo. Only the kernel time is a wait, and a waiting
  process occupies no core, so 8 stages run side by side on 2 cores.

--balancer runs only the load-balancer comparison, in both settings: on the
CPU, where the four replicas share two cores, and on the emulated device,
where they do not. Each also runs an even split without the slowdown.

usage: python benchmarks/parallel.py --json parallel.json [--quick | --bubble | --balancer]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from densa.io import atomic_write_text
from densa.model.config import ModelConfig
from densa.model.llama import Transformer
from densa.train.parallel.engine import EngineConfig, ParallelEngine, lr_lambda, reference_loss
from densa.train.parallel.launch import exit_skipping_teardown


# The emulated device (see above): seconds per block and micro-batch row in forward, and a narrow
# 32-block model whose real computing is a small share of that.
EMULATED_BLOCK_S = 0.01
EMULATED_MODEL = ModelConfig(vocab_size=256, dim=64, n_layers=32, n_heads=8, n_kv_heads=4, ffn_dim=128,
                             max_seq_len=64, attention="dense")
# The balancer's two-block model waits longer per block, so that device time, not the optimizer
# and collectives, dominates its step as it does the pipelines' steps.
BALANCER_BLOCK_S = 0.02


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_batch(rows: int, seq_len: int, vocab: int, step: int) -> torch.Tensor:
    return torch.randint(0, vocab, (rows, seq_len + 1), generator=torch.Generator().manual_seed(1000 + step))


def spawn(world: int, fn, *args) -> None:
    mp.start_processes(_entry, args=(world, free_port(), fn, args), nprocs=world, start_method="spawn")


def _entry(rank: int, world: int, port: int, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(*args)
    finally:
        dist.barrier()
        dist.destroy_process_group()
    exit_skipping_teardown(0)


# -- layouts: loss against one process and the bubble ---------------------------------------------

def single_process_losses(model_cfg: ModelConfig, engine_cfg: EngineConfig, steps: int) -> list[float]:
    torch.set_num_threads(1)
    torch.manual_seed(engine_cfg.seed)
    model = Transformer(model_cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=engine_cfg.lr, betas=(0.9, 0.95),
                                  weight_decay=engine_cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(engine_cfg))
    losses = []
    for step in range(steps):
        loss = reference_loss(model, make_batch(engine_cfg.global_batch, engine_cfg.seq_len, model_cfg.vocab_size,
                                                step))
        loss.backward()
        if engine_cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), engine_cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        losses.append(loss.item())
    return losses


def layout_worker(model_cfg: ModelConfig, engine_cfg: EngineConfig, steps: int, out: str) -> None:
    engine = ParallelEngine(model_cfg, engine_cfg)
    losses, measured, step_times = [], [], []
    for step in range(steps):
        stats = engine.train_step(make_batch(engine_cfg.global_batch, engine_cfg.seq_len, model_cfg.vocab_size,
                                             step))
        losses.append(stats.loss)
        if step > 0:  # the first step also infers shapes and warms up
            measured.append(engine.measured_bubble(stats))
            step_times.append(stats.step_s)
    bubble = engine.schedule_bubble()
    if dist.get_rank() == 0:
        atomic_write_text(out, json.dumps({"losses": losses, "bubble_schedule": bubble,
                                           "bubble_measured": statistics.mean(measured) if measured else 0.0,
                                           "step_s": statistics.median(step_times) if step_times else 0.0}))


def device_name(emulated_device_s: float) -> str:
    return "emulated" if emulated_device_s > 0 else "cpu"


def bench_layout(model_cfg: ModelConfig, engine_cfg: EngineConfig, steps: int, workdir: Path) -> dict:
    device = device_name(engine_cfg.emulated_device_s)
    out = workdir / f"{engine_cfg.layout.name}-{engine_cfg.schedule}-{engine_cfg.microbatches}-{device}.json"
    spawn(engine_cfg.layout.world_size, layout_worker, model_cfg, engine_cfg, steps, str(out))
    result = json.loads(out.read_text())
    reference = single_process_losses(model_cfg, engine_cfg, steps)
    p, m, v = engine_cfg.pp, engine_cfg.microbatches, engine_cfg.virtual_stages
    return {
        "kind": "layout",
        "layout": engine_cfg.layout.name,
        "device": device,
        "emulated_device_s": engine_cfg.emulated_device_s,
        "schedule": engine_cfg.schedule if p > 1 else "none",
        "virtual_stages": v,
        "microbatches": m,
        "steps": steps,
        "bubble_fraction_formula": (p - 1) / (v * m + p - 1) if p > 1 else 0.0,
        "bubble_fraction_schedule": result["bubble_schedule"],
        "bubble_fraction_measured": result["bubble_measured"],
        "step_s": result["step_s"],
        "loss_max_abs_diff_vs_single": max(abs(a - b) for a, b in zip(result["losses"], reference)),
    }


# -- balancer ---------------------------------------------------------------------------------------

def balancer_worker(model_cfg: ModelConfig, engine_cfg: EngineConfig, steps: int, split, out: str) -> None:
    engine = ParallelEngine(model_cfg, engine_cfg)
    if split is not None:
        engine.balancer.set_split(list(split))
    records = []
    for step in range(steps):
        stats = engine.train_step(make_batch(engine_cfg.global_batch, engine_cfg.seq_len, model_cfg.vocab_size,
                                             step))
        # Per-replica compute seconds per row, for the ideal split.
        compute = [torch.zeros(1, dtype=torch.float64) for _ in range(dist.get_world_size())]
        dist.all_gather(compute, torch.tensor([stats.compute_s], dtype=torch.float64))
        records.append({"step_s": stats.step_s, "split": stats.split, "compute_s": [c.item() for c in compute]})
    if dist.get_rank() == 0:
        atomic_write_text(out, json.dumps(records))


def bench_balancer(steps: int, workdir: Path, emulated_device_s: float = 0.0) -> dict:
    """Measure the step time of the static, balanced and ideal splits with replica 3 slowed 2x, and of an even split.

    The even split runs with no replica slowed. With emulated_device_s > 0
    each block waits that long per row in forward and twice that in
    backward, and the real computing is light.
    """
    # On the CPU: large enough that forward and backward, not the collectives, dominate a step.
    model_cfg = ModelConfig(vocab_size=256, dim=256, n_layers=2, n_heads=8, n_kv_heads=4, ffn_dim=512,
                            max_seq_len=256, attention="dense")
    if emulated_device_s:
        model_cfg = model_cfg.replace(dim=64, ffn_dim=128)
    rows_per_replica = 7

    def run(name: str, balance: bool, split=None, slowdown: float = 2.0) -> list[dict]:
        cfg = EngineConfig(dp=4, microbatches=rows_per_replica, seq_len=128, balance_load=balance,
                           slowdown=slowdown, slow_replica=3, emulated_device_s=emulated_device_s)
        out = workdir / f"balancer-{name}-{device_name(emulated_device_s)}.json"
        spawn(4, balancer_worker, model_cfg, cfg, steps, split, str(out))
        return json.loads(out.read_text())

    def settled(records: list[dict]) -> float:
        # The median of the second half: after warm-up and after the balancer has converged.
        return statistics.median(r["step_s"] for r in records[len(records) // 2 :])

    static = run("static", balance=False)
    balanced = run("balanced", balance=True)

    # Ideal split: shares proportional to each replica's measured rows per compute second.
    rows = static[-1]["split"]
    per_row = [statistics.median(r["compute_s"][i] / rows[i] for r in static[1:]) for i in range(4)]
    speed = [1 / c for c in per_row]
    total = 4 * rows_per_replica
    ideal_split = [max(1, round(total * s / sum(speed))) for s in speed]
    ideal_split[ideal_split.index(max(ideal_split))] += total - sum(ideal_split)
    ideal = run("ideal", balance=False, split=ideal_split)
    even = run("even", balance=False, slowdown=1.0)
    return {
        "kind": "balancer",
        "layout": "dp4-tp1-pp1",
        "device": device_name(emulated_device_s),
        "emulated_device_s": emulated_device_s,
        "slowdown": 2.0,
        "static_step_s": settled(static),
        "balanced_step_s": settled(balanced),
        "ideal_step_s": settled(ideal),
        "unslowed_step_s": settled(even),
        "static_split": static[-1]["split"],
        "balanced_split": balanced[-1]["split"],
        "balanced_split_per_step": [r["split"] for r in balanced],
        "ideal_split": ideal_split,
        "steps": steps,
    }


# -- recovery -------------------------------------------------------------------------------------

def run_job(out: Path, steps: int, *extra: str) -> dict:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--nnodes", "1",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--max-restarts", "1",
        "-m", "densa.train.parallel.worker", "--out", str(out), "--synthetic", "64", "--vocab-size", "256",
        "--dim", "128", "--n-layers", "4", "--n-heads", "8", "--n-kv-heads", "4", "--ffn-dim", "256",
        "--dp", "2", "--microbatches", "2", "--seq-len", "64", "--steps", str(steps), "--snapshot-every", "5",
        *extra,
    ]
    env = dict(os.environ, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1", OMP_NUM_THREADS="1")
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    if result.returncode:
        raise RuntimeError(f"torchrun failed with code {result.returncode}:\n{result.stderr[-3000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    summary["losses"] = {r["step"]: r["loss"] for r in records}
    summary["records"] = records
    return summary


def bench_recovery(steps: int, workdir: Path) -> dict:
    fail_at = steps // 2 + 1
    clean = run_job(workdir / "clean", steps)
    killed = run_job(workdir / "killed", steps, "--fail-at-step", str(fail_at), "--fail-rank", "1")
    fault_time = json.loads((workdir / "killed" / "fault.json").read_text())["time"]
    resumed = [r for r in killed["records"] if r["restart"] == 1]
    return {
        "kind": "recovery",
        "layout": "dp2-tp1-pp1",
        "killed_before_step": fail_at,
        "recovery_s": resumed[0]["time"] - fault_time,
        "resumed_equal": killed["losses"] == clean["losses"]
        and killed["parameter_sha256"] == clean["parameter_sha256"],
        "restarts": killed["restarts"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", required=True, help="file for the records")
    parser.add_argument("--quick", action="store_true", help="fewer layouts and steps (a smoke run)")
    parser.add_argument("--bubble", action="store_true",
                        help="only the measured bubble: compute-bound two-stage pipelines on the CPU, "
                        "and 2, 4 and 8 stages on the emulated device")
    parser.add_argument("--balancer", action="store_true",
                        help="only the load-balancer comparison, on the CPU and on the emulated device")
    args = parser.parse_args()
    if args.quick + args.bubble + args.balancer > 1:
        parser.error("--quick, --bubble and --balancer are exclusive; choose one")

    # 16 layers so that pp = 8 can run 2 interleaved stages per rank; dim 128 so
    # that compute, not per-micro-batch overhead, dominates a pipeline step.
    small = ModelConfig(vocab_size=256, dim=128, n_layers=16, n_heads=8, n_kv_heads=4, ffn_dim=256,
                        max_seq_len=64, attention="dense")
    layouts = [
        EngineConfig(dp=2, tp=2, pp=2, microbatches=8, seq_len=32),
        EngineConfig(dp=2, microbatches=2, seq_len=32),
        EngineConfig(tp=2, microbatches=2, seq_len=32),
        EngineConfig(pp=2, microbatches=4, seq_len=32),
        EngineConfig(pp=2, microbatches=20, seq_len=32),
        EngineConfig(pp=2, microbatches=10, seq_len=32, schedule="interleaved"),
        EngineConfig(pp=4, microbatches=58, seq_len=32),
        EngineConfig(pp=4, microbatches=32, seq_len=32, schedule="interleaved"),
    ]
    if not args.quick:
        layouts += [
            EngineConfig(pp=8, microbatches=134, seq_len=32),
            EngineConfig(pp=8, microbatches=72, seq_len=32, schedule="interleaved"),
            EngineConfig(tp=8, microbatches=2, seq_len=32),
        ]
    steps = 3 if args.quick else 4
    if args.bubble:
        # 8 layers of width 256 and 4 x 128-token micro-batches: about 40x the
        # work per stage and micro-batch of the layouts above, while the fixed
        # cost of each micro-batch (Python, gloo handshakes) stays the same.
        small = ModelConfig(vocab_size=256, dim=256, n_layers=8, n_heads=8, n_kv_heads=4, ffn_dim=688,
                            max_seq_len=128, attention="dense")
        layouts = [
            EngineConfig(pp=2, microbatches=20, microbatch_size=4, seq_len=128),
            EngineConfig(pp=2, microbatches=40, microbatch_size=4, seq_len=128),
            EngineConfig(pp=2, microbatches=80, microbatch_size=4, seq_len=128),
            EngineConfig(pp=2, microbatches=10, microbatch_size=4, seq_len=128, schedule="interleaved"),
            EngineConfig(pp=2, microbatches=20, microbatch_size=4, seq_len=128, schedule="interleaved"),
        ]
        # The emulated device: micro-batch counts at which 1F1B's (p - 1)/(m + p - 1) is 4% and 3%, and
        # the interleaved (p - 1)/(2m + p - 1) 3%. What the schedule does not count shows as the gap above.
        emulated = dict(seq_len=32, emulated_device_s=EMULATED_BLOCK_S)
        for pp, counts in ((2, (24, 32)), (4, (72, 96)), (8, (168, 224))):
            layouts += [EngineConfig(pp=pp, microbatches=m, **emulated) for m in counts]
            layouts.append(EngineConfig(pp=pp, microbatches=counts[1] // 2, schedule="interleaved", **emulated))
    if args.balancer:
        layouts = []
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for cfg in layouts:
            model_cfg = small.replace(n_kv_heads=8) if cfg.tp == 8 else small
            if cfg.emulated_device_s:
                model_cfg = EMULATED_MODEL
            start = time.perf_counter()
            records.append(bench_layout(model_cfg, cfg, steps, workdir))
            print(json.dumps(records[-1]), f"({time.perf_counter() - start:.0f}s)", flush=True)
        if not args.bubble:
            records.append(bench_balancer(8 if args.quick else 16, workdir))
            print(json.dumps(records[-1]), flush=True)
        if args.balancer:
            records.append(bench_balancer(16, workdir, emulated_device_s=BALANCER_BLOCK_S))
            print(json.dumps(records[-1]), flush=True)
        if not args.bubble and not args.balancer:
            records.append(bench_recovery(10 if args.quick else 20, workdir))
            print(json.dumps(records[-1]), flush=True)
    meta = {"torch": torch.__version__, "cpus": os.cpu_count(), "backend": "gloo", "device": "cpu"}
    atomic_write_text(args.json, json.dumps({"machine": meta, "records": records}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
