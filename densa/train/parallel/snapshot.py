"""Snapshots with torch.distributed.checkpoint (DCP): save at one layout, resume at any other.

A snapshot contains the model and optimizer state under the original model's
parameter names (each rank writes only its own shards), the step count (which
is also the data position: batches are a function of the step), the lr
scheduler position, the load balancer's weights and every rank's RNG state.
DCP reshards on load, so a run saved as dp2-tp2-pp2 resumes as dp4 or pp4.

Layout of a snapshot directory:

    step_00000100/   one DCP checkpoint (.metadata plus one file per rank)
    latest           name of the newest complete checkpoint, written last

`export_checkpoint` turns a snapshot's model into the single-process
checkpoint format (safetensors) that `densa generate` and `load_model` read.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from densa.io import atomic_write_text
from densa.model.config import ModelConfig
from densa.model.llama import Transformer
from densa.train.checkpoint import save_checkpoint

logger = logging.getLogger(__name__)

LATEST = "latest"
# Flattened optimizer state is keyed by parameter name, so the states of
# several stage modules on one rank merge into one dictionary.
OPTIM_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


def _engine_state(engine) -> dict:
    model: dict = {}
    optim: dict = {}
    for module, optimizer in zip(engine.modules, engine.optimizers):
        model.update(get_model_state_dict(module))
        optim.update(get_optimizer_state_dict(module, optimizer, options=OPTIM_OPTIONS))
    return {
        "model": model,
        "optim": optim,
        "step": torch.tensor(engine.step_count, dtype=torch.int64),
        "balancer": {"weights": torch.tensor(engine.balancer.weights, dtype=torch.float64)},
        "rng": {f"rank{dist.get_rank()}": torch.get_rng_state()},
    }


def save_snapshot(engine, directory: str | Path) -> Path:
    """Write a snapshot of `engine` at its current step (a collective: every rank calls it)."""
    directory = Path(directory)
    path = directory / f"step_{engine.step_count:08d}"
    dcp.save(_engine_state(engine), checkpoint_id=str(path))
    # Only a checkpoint that every rank finished is published as the latest one.
    dist.barrier()
    if dist.get_rank() == 0:
        atomic_write_text(directory / LATEST, path.name + "\n")
    dist.barrier()
    logger.info("saved snapshot %s", path)
    return path


def latest_snapshot(directory: str | Path) -> Path | None:
    """Return the newest complete snapshot in `directory`, or None when there is none."""
    pointer = Path(directory) / LATEST
    if not pointer.exists():
        return None
    path = Path(directory) / pointer.read_text(encoding="utf-8").strip()
    if not (path / ".metadata").exists():
        raise FileNotFoundError(f"snapshot {path} named by {pointer} has no .metadata; remove {pointer} to restart")
    return path


def load_snapshot(engine, path: str | Path) -> int:
    """Restore `engine` from a snapshot written at any layout and return the step it resumes from."""
    path = Path(path)
    saved = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    state = _engine_state(engine)

    # RNG states and balancer weights belong to the saving layout; keep only what matches this one.
    rng_key = f"rank{dist.get_rank()}"
    if f"rng.{rng_key}" not in saved:
        state.pop("rng")
    weights = saved.get("balancer.weights")
    if weights is None or tuple(weights.size) != tuple(state["balancer"]["weights"].shape):
        state.pop("balancer")

    dcp.load(state, checkpoint_id=str(path))

    for module, optimizer in zip(engine.modules, engine.optimizers):
        set_model_state_dict(module, state["model"], options=StateDictOptions(strict=False))
        set_optimizer_state_dict(module, optimizer, state["optim"], options=OPTIM_OPTIONS)
    step = int(state["step"])
    engine.step_count = step
    # The optimizer state already restored each group's lr; the scheduler only needs its position.
    for scheduler in engine.schedulers:
        lrs = [group["lr"] for group in scheduler.optimizer.param_groups]
        position = scheduler.state_dict()
        position.update(last_epoch=step, _last_lr=lrs)
        scheduler.load_state_dict(position)
    if "balancer" in state:
        engine.balancer.load_state_dict({"weights": state["balancer"]["weights"].tolist()})
    if "rng" in state:
        torch.set_rng_state(state["rng"][rng_key])
    logger.info("resumed from %s at step %d", path, step)
    return step


def export_checkpoint(snapshot: str | Path, model_config: ModelConfig, dest: str | Path,
                      tokenizer_json: str | None = None, train_config: dict | None = None) -> Path:
    """Write the whole model of a snapshot as a checkpoint folder at `dest` and return it.

    One process reads every rank's shards (DCP without a process group,
    `no_dist=True`), so call it on one rank after the snapshot is complete.
    """
    model = Transformer(model_config)
    state = {"model": model.state_dict()}
    with warnings.catch_warnings():
        # DCP warns that it loads in one process, which is what no_dist=True means.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        dcp.load(state, checkpoint_id=str(snapshot), no_dist=True)
    model.load_state_dict(state["model"])
    return save_checkpoint(dest, model, train_config=train_config, tokenizer_json=tokenizer_json)
