"""Worker entry point that torchrun starts on every process: `python -m densa.train.parallel.worker ...`.

Each worker joins the process group (NCCL on GPU, gloo on CPU) and builds
the engine. It resumes from the newest snapshot in OUT/snapshots when there is
one, which is how a job restarted by torchrun --max-restarts continues. Then
it trains and writes a snapshot every --snapshot-every steps. Rank 0 appends one JSON
line per step to OUT/metrics.jsonl. At the end it writes OUT/summary.json and exports the model to
OUT/checkpoint, the single-process format that `densa generate` loads.

Every batch carries the token densities next to the token ids: those of
DensityAnalyzer for text, seeded uniform ones for --synthetic data. Density
attention builds its block plans from them, and the other patterns ignore them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import signal
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from densa.density.plan import PlanConfig
from densa.io import atomic_write_text
from densa.model.config import ModelConfig, preset
from densa.train.parallel.engine import EngineConfig, ParallelEngine
from densa.train.parallel.launch import exit_skipping_teardown, init_worker_process_group
from densa.train.parallel.pipeline import SCHEDULES
from densa.train.checkpoint import TOKENIZER_FILE
from densa.train.parallel.snapshot import export_checkpoint, latest_snapshot, load_snapshot, save_snapshot
from densa.train.trainer import DTYPES, batch_indices

logger = logging.getLogger("densa.train.parallel.worker")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="densa.train.parallel.worker", description=__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for snapshots, metrics and the summary")
    parser.add_argument("--data", type=Path, help="a .txt or .jsonl file or a folder (default: built-in corpus)")
    parser.add_argument("--synthetic", type=int, default=0,
                        help="train on this many seeded random sequences instead of text (tests, benchmarks)")

    model = parser.add_argument_group("model")
    model.add_argument("--config", default="tiny", help="model preset")
    model.add_argument("--attention", default="dense", choices=["dense", "sliding", "density"],
                       help="attention pattern")
    model.add_argument("--window", type=int, default=128, help="window of sliding attention, in tokens")
    model.add_argument("--threshold", type=float, default=0.7,
                       help="token density at or above which a token counts as dense (density attention)")
    model.add_argument("--block-size", type=int, default=128, help="kernel block size of the block plans, in tokens")
    model.add_argument("--domain-dict", type=Path, action="append", default=[],
                       help="domain term list for the density analyser; repeatable")
    model.add_argument("--vocab-size", type=int, default=4096, help="vocabulary size")
    model.add_argument("--dim", type=int, default=0, help="override the preset's model dim")
    model.add_argument("--n-layers", type=int, default=0, help="override the preset's layer count")
    model.add_argument("--n-heads", type=int, default=0, help="override the preset's query heads")
    model.add_argument("--n-kv-heads", type=int, default=0, help="override the preset's key/value heads")
    model.add_argument("--ffn-dim", type=int, default=0, help="override the preset's SwiGLU hidden size")

    par = parser.add_argument_group("parallelism")
    par.add_argument("--dp", type=int, default=1, help="data-parallel degree")
    par.add_argument("--tp", type=int, default=1, help="tensor-parallel degree")
    par.add_argument("--pp", type=int, default=1, help="pipeline-parallel degree")
    par.add_argument("--microbatches", type=int, default=0, help="micro-batches per replica (0: 4 x pp)")
    par.add_argument("--microbatch-size", type=int, default=1, help="sequences per micro-batch")
    par.add_argument("--schedule", default="1f1b", choices=SCHEDULES, help="pipeline schedule")
    par.add_argument("--virtual-stages", type=int, default=0, help="stages per rank (0: 1, or 2 when interleaved)")
    par.add_argument("--stage-balance", default="params", choices=["params", "time"],
                     help="cut stages by parameter count or by measured layer time")
    par.add_argument("--balance-load", action="store_true", help="rebalance replicas' shares by utilisation")

    train = parser.add_argument_group("training")
    train.add_argument("--steps", type=int, default=100, help="total optimizer steps, resumed ones included")
    train.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    train.add_argument("--lr", type=float, default=3e-4, help="peak learning rate")
    train.add_argument("--warmup-steps", type=int, default=0, help="linear warm-up steps")
    train.add_argument("--grad-clip", type=float, default=1.0, help="maximum global gradient norm (0: no clipping)")
    train.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="compute dtype (autocast)")
    train.add_argument("--seed", type=int, default=0, help="seed of the model init and the data order")
    train.add_argument("--snapshot-every", type=int, default=0, help="steps between snapshots (0: end only)")
    train.add_argument("--resume", type=Path,
                       help="snapshot folder to start from when OUT/snapshots has none (any layout)")

    fault = parser.add_argument_group("fault injection (recovery drills and benchmarks)")
    fault.add_argument("--fail-at-step", type=int, default=0, help="SIGKILL one worker before this step, first run only")
    fault.add_argument("--fail-rank", type=int, default=0, help="global rank that --fail-at-step kills")
    fault.add_argument("--slowdown", type=float, default=1.0, help="make one replica's compute this many times slower")
    fault.add_argument("--slow-replica", type=int, default=0, help="data-parallel replica that --slowdown slows")
    return parser


def model_config_from(args) -> ModelConfig:
    changes = {name: getattr(args, name) for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim")
               if getattr(args, name)}
    plan = PlanConfig(threshold=args.threshold, block_size=args.block_size)
    config = preset(args.config, vocab_size=args.vocab_size, attention=args.attention, window=args.window, plan=plan)
    return config.replace(max_seq_len=max(config.max_seq_len, args.seq_len), **changes)


def load_tokens(args, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Training sequences: tokens int64 and densities float32, [S, seq_len + 1] each and the same on every rank."""
    if args.synthetic:
        generator = torch.Generator().manual_seed(args.seed)
        tokens = torch.randint(0, args.vocab_size, (args.synthetic, args.seq_len + 1), generator=generator)
        return tokens, torch.rand(args.synthetic, args.seq_len + 1, generator=generator)
    path = args.out / "tokens.pt"
    if rank == 0:
        # One rank tokenizes (BPE training is not free); the others read its result.
        from densa.data.corpus import builtin_corpus
        from densa.data.readers import read_documents
        from densa.density import DensityConfig
        from densa.train.recipe import prepare_data

        documents = builtin_corpus() if args.data is None else read_documents(args.data)
        analyzer_config = DensityConfig(domain_dicts=tuple(str(p) for p in args.domain_dict))
        data = prepare_data(documents, args.seq_len, args.vocab_size, seed=args.seed,
                            analyzer_config=analyzer_config, cache_dir=args.out / "cache")
        atomic_write_text(args.out / TOKENIZER_FILE, data.tokenizer.to_json())
        tmp = path.with_suffix(".tmp")
        torch.save({"tokens": data.train.tokens, "density": data.train.density}, tmp)
        os.replace(tmp, path)
    dist.barrier()
    data = torch.load(path, weights_only=True)
    return data["tokens"], data["density"]


def parameter_digest(engine: ParallelEngine) -> str:
    """SHA-256 over every full parameter of the model in name order (a collective; the result is on all ranks)."""
    local = {name: hashlib.sha256(p.numpy().tobytes()).hexdigest() for name, p in engine.full_parameters().items()}
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    merged = {}
    for part in parts:
        merged.update(part)
    return hashlib.sha256("".join(f"{k}:{merged[k]};" for k in sorted(merged)).encode()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    init_worker_process_group(timedelta(minutes=5))
    rank = dist.get_rank()
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
    if rank != 0:
        logging.getLogger().setLevel(logging.WARNING)

    try:
        model_config = model_config_from(args)
        engine_config = EngineConfig(
            dp=args.dp, tp=args.tp, pp=args.pp, microbatches=args.microbatches,
            microbatch_size=args.microbatch_size, schedule=args.schedule, virtual_stages=args.virtual_stages,
            stage_balance=args.stage_balance, seq_len=args.seq_len, lr=args.lr, warmup_steps=args.warmup_steps,
            max_steps=args.steps, seed=args.seed, balance_load=args.balance_load, slowdown=args.slowdown,
            slow_replica=args.slow_replica, grad_clip=args.grad_clip, dtype=args.dtype,
        )
        tokens, density = load_tokens(args, rank)
        engine = ParallelEngine(model_config, engine_config)
        snapshots = args.out / "snapshots"
        latest = latest_snapshot(snapshots)
        if latest is None and args.resume is not None:
            latest = latest_snapshot(args.resume)
            if latest is None:
                raise FileNotFoundError(f"no snapshot found in --resume {args.resume}; pass an OUT/snapshots folder")
        if latest is not None:
            load_snapshot(engine, latest)
            if engine.step_count >= args.steps and rank == 0:
                logger.warning("the snapshot is at step %d, which already reaches --steps %d (the total step "
                               "count), so nothing is trained; raise --steps to continue", engine.step_count,
                               args.steps)
        metrics = args.out / "metrics.jsonl"

        while engine.step_count < args.steps:
            step = engine.step_count
            if args.fail_at_step and step == args.fail_at_step and restart == 0 and rank == args.fail_rank:
                atomic_write_text(args.out / "fault.json", json.dumps({"step": step, "rank": rank,
                                                                       "time": time.time()}))
                logger.warning("fault injection: killing rank %d before step %d", rank, step)
                os.kill(os.getpid(), signal.SIGKILL)
            rows = batch_indices(step, len(tokens), engine_config.global_batch, args.seed)
            stats = engine.train_step(tokens[rows], density[rows])
            if rank == 0:
                record = {"step": stats.step, "loss": stats.loss, "grad_norm": stats.grad_norm,
                          "step_s": stats.step_s, "utilisation": stats.utilisation, "split": stats.split,
                          "time": time.time(), "restart": restart}
                with open(metrics, "a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")
                unit = "micro-batches" if engine.layout.pp_enabled else "rows"
                logger.info("step %d loss %.4f grad norm %.3f %.3fs, %s per replica %s", stats.step, stats.loss,
                            stats.grad_norm, stats.step_s, unit, stats.split)
            if args.snapshot_every and stats.step % args.snapshot_every == 0 and stats.step < args.steps:
                save_snapshot(engine, snapshots)

        final = save_snapshot(engine, snapshots)
        digest = parameter_digest(engine)
        if rank == 0:
            tokenizer = args.out / TOKENIZER_FILE
            tokenizer_json = tokenizer.read_text(encoding="utf-8") if tokenizer.exists() else None
            export_checkpoint(final, model_config, args.out / "checkpoint", tokenizer_json,
                              train_config={"steps": engine.step_count, "layout": engine.layout.name})
            logger.info("wrote %s for densa generate", args.out / "checkpoint")
            summary = {"layout": engine.layout.name, "steps": engine.step_count, "parameter_sha256": digest,
                       "restarts": restart}
            atomic_write_text(args.out / "summary.json", json.dumps(summary, indent=2) + "\n")
    except BaseException:
        # No barrier here: peers may be blocked in a collective that this rank will never join.
        logger.exception("rank %d failed", rank)
        dist.destroy_process_group()
        raise
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    exit_skipping_teardown(main())
