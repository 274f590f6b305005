"""`densa train --nproc N --dp A --tp B --pp C`: start the parallel workers with torchrun.

The launcher turns the `densa train` flags into a torchrun command
(torch.distributed.run) running densa.train.parallel.worker on every
process, with NCCL on GPUs and gloo on CPU. Several machines join one job
through the c10d rendezvous: run the same command on each with --nnodes,
--node-rank and the same --rdzv-endpoint. With --max-restarts K, torchrun
restarts every worker after a failure and the workers resume from the newest
snapshot in OUT/snapshots.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from densa.cli.common import positive_int
from densa.io import InputError
from densa.train.parallel.pipeline import SCHEDULES

logger = logging.getLogger(__name__)

# `densa train` flags forwarded to the worker unchanged: (attribute, worker flag).
FORWARDED = [
    ("data", "--data"),
    ("config", "--config"),
    ("attention", "--attention"),
    ("window", "--window"),
    ("threshold", "--threshold"),
    ("block_size", "--block-size"),
    ("vocab_size", "--vocab-size"),
    ("steps", "--steps"),
    ("seq_len", "--seq-len"),
    ("lr", "--lr"),
    ("warmup_steps", "--warmup-steps"),
    ("grad_clip", "--grad-clip"),
    ("dtype", "--dtype"),
    ("seed", "--seed"),
    ("ckpt_every", "--snapshot-every"),
    ("resume", "--resume"),
]


def add_parallel_args(parser: argparse.ArgumentParser) -> None:
    """Add the multi-process flags to the `densa train` parser."""
    group = parser.add_argument_group("parallel training (torchrun)")
    group.add_argument("--nproc", type=positive_int, default=1,
                       help="processes per machine; more than 1 starts torchrun")
    group.add_argument("--dp", type=int, default=0, help="data-parallel degree (0: world size / (tp x pp))")
    group.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (within a machine)")
    group.add_argument("--pp", type=int, default=1, help="pipeline-parallel degree")
    group.add_argument("--microbatches", type=int, default=0,
                       help="pipeline micro-batches per data-parallel replica (0: 4 x pp)")
    group.add_argument("--schedule", choices=SCHEDULES, default="1f1b", help="pipeline schedule")
    group.add_argument("--nnodes", default="1", help="machines in the job, or MIN:MAX for an elastic job")
    group.add_argument("--node-rank", type=int, default=0, help="this machine's index, 0 to nnodes - 1")
    group.add_argument("--rdzv-endpoint", default="127.0.0.1:29500",
                       help="HOST:PORT of the rendezvous, the same on every machine")
    group.add_argument("--max-restarts", type=int, default=0,
                       help="times torchrun restarts the workers after a failure (they resume from the last snapshot)")


def torchrun_command(args: argparse.Namespace) -> list[str]:
    """Build the torchrun command line for `args`, raising InputError for impossible layouts."""
    nproc = args.nproc
    max_nodes = int(str(args.nnodes).split(":")[-1])
    world = nproc * max_nodes
    tp, pp = args.tp, args.pp
    if nproc < 1 or tp < 1 or pp < 1 or args.dp < 0:
        raise InputError(f"--nproc {nproc}, --tp {tp}, --pp {pp}, --dp {args.dp}: degrees must be positive")
    if world % (tp * pp):
        raise InputError(f"{world} processes cannot hold tp x pp = {tp * pp}; choose --nproc a multiple of it")
    dp = args.dp or world // (tp * pp)
    if dp * tp * pp != world:
        raise InputError(
            f"--dp {dp} x --tp {tp} x --pp {pp} = {dp * tp * pp} does not match {world} processes "
            f"({nproc} per machine x {max_nodes} machines); make the product equal"
        )
    if not 0 <= args.node_rank < max_nodes:
        raise InputError(f"--node-rank {args.node_rank} is outside 0 to {max_nodes - 1}; number the machines "
                         "from 0, or raise --nnodes")
    host, _, port = args.rdzv_endpoint.rpartition(":")
    if not host or not port.isdigit():
        raise InputError(f"--rdzv-endpoint {args.rdzv_endpoint!r} is invalid; use HOST:PORT, e.g. 10.0.0.1:29500")
    check_inputs(args)
    if getattr(args, "eval_every", None) is not None:
        logger.warning("--eval-every is ignored with several processes: they log the training loss, and held-out "
                       "evaluation runs in single-process training")
    microbatches = args.microbatches or (4 * pp if pp > 1 else 1)
    batch_size = getattr(args, "batch_size", dp * microbatches)
    if batch_size % (dp * microbatches):
        raise InputError(
            f"--batch-size {batch_size} does not split into {dp} replica(s) x {microbatches} micro-batch(es); "
            f"use a multiple of {dp * microbatches}"
        )

    worker = ["--out", str(getattr(args, "out", "runs/train")), "--dp", str(dp), "--tp", str(tp), "--pp", str(pp),
              "--microbatches", str(microbatches), "--microbatch-size", str(batch_size // (dp * microbatches)),
              "--schedule", args.schedule]
    for attribute, flag in FORWARDED:
        value = getattr(args, attribute, None)
        if value is not None:
            worker += [flag, str(value)]
    for path in getattr(args, "domain_dict", []):
        worker += ["--domain-dict", str(path)]
    prefix = torchrun_prefix(nproc, args.nnodes, args.node_rank, args.rdzv_endpoint, args.max_restarts, "densa-train")
    return [*prefix, "-m", "densa.train.parallel.worker", *worker]


def check_inputs(args: argparse.Namespace) -> None:
    """Reject bad input files before torchrun starts, because inside the workers the error fails every rank.

    The data goes through the same reader as a single-process run, so a
    missing, empty or binary file gets the same message.
    """
    from densa.data.readers import read_documents
    from densa.train.parallel.snapshot import latest_snapshot

    for path in getattr(args, "domain_dict", []):
        if not os.path.isfile(path):
            raise InputError(f"domain dictionary not found: {path}; pass a text file with one term per line")
    data = getattr(args, "data", None)
    if data is not None:
        read_documents(data)
    resume = getattr(args, "resume", None)
    if resume is not None:
        try:
            found = os.path.isdir(resume) and latest_snapshot(resume) is not None
        except FileNotFoundError as err:
            raise InputError(str(err)) from None
        if not found:
            raise InputError(
                f"no snapshot in --resume {resume}; pass the OUT/snapshots folder of a multi-process run "
                "(a single-process checkpoint resumes with --nproc 1)"
            )


def torchrun_prefix(nproc: int, nnodes: str = "1", node_rank: int = 0, rdzv_endpoint: str | None = None,
                    max_restarts: int = 0, rdzv_id: str = "densa") -> list[str]:
    """Return the torchrun command up to the worker; rdzv_endpoint None means one machine (--standalone)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
    if rdzv_endpoint is None:
        # --standalone starts a private rendezvous on a free local port.
        return [*command, "--standalone", "--max-restarts", str(max_restarts)]
    return [*command, "--nnodes", str(nnodes), "--node-rank", str(node_rank), "--rdzv-backend", "c10d",
            "--rdzv-endpoint", rdzv_endpoint, "--rdzv-id", rdzv_id, "--max-restarts", str(max_restarts)]


def launch(args: argparse.Namespace) -> int:
    """Run torchrun for `args` and return its exit code."""
    return run_torchrun(torchrun_command(args))


def run_torchrun(command: list[str]) -> int:
    """Run a torchrun command with the environment its CPU and GPU workers need; return its exit code."""
    env = dict(os.environ)
    if not torch.cuda.is_available():
        # gloo workers of a restarted job must not reuse the agent's TCP store
        # from the failed attempt, or their rendezvous keys collide.
        env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")
    logger.info("starting: %s", " ".join(command))
    return subprocess.call(command, env=env)


def init_worker_process_group(timeout: timedelta) -> None:
    """Join the process group that torchrun describes in the environment: NCCL on GPUs, gloo on CPU."""
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl", timeout=timeout)
    else:
        dist.init_process_group("gloo", timeout=timeout)


def exit_skipping_teardown(code: int) -> None:
    """Flush the output streams and leave the process with `code`, skipping interpreter teardown.

    NOTE: after its process group was destroyed and all outputs written, a
    gloo worker sometimes aborted during interpreter teardown ("terminate
    called without an active exception", SIGABRT), both after torchrun
    restarts and after interleaved pipeline runs. Skipping the teardown keeps
    a finished worker's exit code. Callers must have closed what they wrote.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
