"""`densa plan`: rank (dp, tp, pp, micro-batch) layouts for a model and cluster by estimated step time."""

from __future__ import annotations

import argparse
import json

from densa.cli import HelpFormatter
from densa.io import InputError, atomic_write_text
from densa.train.parallel.planner import GPUS, RECOMPUTE_KINDS, SHARDING_KINDS, PlanRequest, assumptions, plan

DESCRIPTION = """\
Estimate memory per GPU, step time, communication share and pipeline bubble for
every valid layout, from closed-form formulas (Megatron-LM's memory and FLOP
model, ring all-reduce volume, the 1F1B bubble). The hardware peaks it assumes
are printed with their source. Estimates, not measurements.

example: densa plan --params 70e9 --gpus 256 --gpu a100-80g --seq 4096 --global-batch 1024
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "plan", help="estimate and rank parallel layouts", description=DESCRIPTION, formatter_class=HelpFormatter
    )
    parser.add_argument("--params", type=float, required=True, help="model parameters, e.g. 70e9")
    parser.add_argument("--gpus", type=int, required=True, help="total number of GPUs")
    parser.add_argument("--gpu", choices=sorted(GPUS), default="a100-80g", help="accelerator model")
    parser.add_argument("--seq", type=int, default=4096, help="sequence length in tokens")
    parser.add_argument("--global-batch", type=int, default=1024, help="sequences per optimizer step")
    parser.add_argument("--layers", type=int, default=0, help="decoder layers (0: derive from --params)")
    parser.add_argument("--hidden", type=int, default=0, help="model dim (0: derive from --params)")
    parser.add_argument("--heads", type=int, default=0, help="attention heads (0: hidden / 128)")
    parser.add_argument("--vocab", type=int, default=32000, help="vocabulary size")
    parser.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per machine (0: the GPU's usual node)")
    parser.add_argument("--recompute", choices=RECOMPUTE_KINDS, default="selective",
                        help="activation recomputation assumed in the memory model")
    parser.add_argument("--sharding", choices=SHARDING_KINDS, default="fsdp",
                        help="data-parallel replicas shard model states (fsdp) or replicate them (ddp)")
    parser.add_argument("--efficiency", type=float, default=0.6,
                        help="assumed fraction of peak FLOP/s reached by the matrix multiplications")
    parser.add_argument("--top", type=int, default=10, help="layouts to print")
    parser.add_argument("--json", metavar="FILE", help="also write every estimate and the assumptions as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        request = PlanRequest(
            params=args.params, gpus=args.gpus, gpu=args.gpu, seq=args.seq, global_batch=args.global_batch,
            layers=args.layers, hidden=args.hidden, heads=args.heads, vocab=args.vocab,
            gpus_per_node=args.gpus_per_node, recompute=args.recompute, sharding=args.sharding,
            efficiency=args.efficiency,
        )
    except ValueError as err:
        raise InputError(str(err)) from err
    if args.top < 1:
        raise InputError(f"--top {args.top} is invalid; print at least 1 layout")
    estimates = plan(request)
    if not estimates:
        raise InputError(
            f"no valid layout for {request.gpus} GPUs, {request.layers} layers, {request.heads} heads and a global "
            f"batch of {request.global_batch}; use a GPU count and batch with common divisors"
        )
    facts = assumptions(request)

    shape = "derived from --params" if request.derived_shape else "given"
    print(f"model: {request.params:.3g} parameters, {request.layers} layers, hidden {request.hidden}, "
          f"{request.heads} heads, vocab {request.vocab} ({shape}); seq {request.seq}, "
          f"global batch {request.global_batch} sequences")
    print(f"hardware: {request.gpus} x {facts['gpu']}, {facts['peak_tflops_bf16']:g} TFLOP/s bf16 peak, "
          f"{facts['memory_gib']:g} GiB, {facts['intra_node_gbps']:g} GB/s in node, "
          f"{facts['inter_node_gbps']:g} GB/s between nodes, {facts['gpus_per_node']} GPUs per node")
    print(f"source: {facts['hardware_source']}")
    print(f"assumed: {facts['efficiency']:.0%} of peak in matmuls, recompute={facts['recompute']}, "
          f"sharding={facts['sharding']}, no compute/communication overlap")
    print()
    header = f"{'rank':>4} {'layout':<16} {'v':>2} {'mb':>3} {'m':>5} {'mem GiB':>8} {'fits':>4} " \
             f"{'step s':>8} {'comm %':>6} {'bubble %':>8} {'MFU %':>6}"
    print(header)
    for rank, e in enumerate(estimates[: args.top], start=1):
        print(f"{rank:>4} {e.layout:<16} {e.virtual_stages:>2} {e.microbatch_size:>3} {e.microbatches:>5} "
              f"{e.memory_gib:>8.1f} {'yes' if e.fits else 'no':>4} {e.step_s:>8.2f} {100 * e.comm_fraction:>6.1f} "
              f"{100 * e.bubble_fraction:>8.1f} {100 * e.mfu:>6.1f}")
    fitting = sum(e.fits for e in estimates)
    print(f"\n{len(estimates)} valid layouts, {fitting} fit in memory; v: stages per rank, mb: micro-batch size, "
          "m: micro-batches per step")

    if args.json:
        record = {
            "request": {k: v for k, v in vars(request).items()},
            "assumptions": facts,
            "layouts": [e.to_dict() for e in estimates],
        }
        atomic_write_text(args.json, json.dumps(record, indent=2) + "\n")
    return 0
