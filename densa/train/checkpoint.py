"""Checkpoints: a folder with model weights (safetensors), configs, tokenizer and trainer state.

Layout of a checkpoint folder:
    model.safetensors   model weights
    config.json         {"model": ModelConfig, "train": TrainConfig or null}
    tokenizer.json      the HF tokenizer, when one was saved with the model
    trainer.pt          optimizer, scheduler, step and RNG states (tensors and plain
                        containers only, loaded with weights_only=True)

A folder is written under a temporary name and renamed into place, so a crash
never leaves a half-written checkpoint where a reader expects a whole one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from densa.io import InputError, current_umask
from densa.model.config import ModelConfig
from densa.model.llama import Transformer

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
TRAINER_FILE = "trainer.pt"


def save_checkpoint(
    path: str | os.PathLike,
    model: Transformer,
    train_config: dict | None = None,
    trainer_state: dict | None = None,
    tokenizer_json: str | None = None,
) -> Path:
    """Write a checkpoint folder at `path`, replacing any previous one atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    # mkdtemp creates the folder private (0700); checkpoints get the usual umask-based mode.
    os.chmod(tmp, 0o777 & ~current_umask())
    try:
        weights = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
        save_file(weights, tmp / MODEL_FILE)
        config = {"model": model.config.to_dict(), "train": train_config}
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2), encoding="utf-8")
        if tokenizer_json is not None:
            (tmp / TOKENIZER_FILE).write_text(tokenizer_json, encoding="utf-8")
        if trainer_state is not None:
            torch.save(trainer_state, tmp / TRAINER_FILE)

        # Swap folders: move the old one aside, move the new one in, drop the old.
        old = path.with_name(f".{path.name}.old")
        if old.exists():
            shutil.rmtree(old)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        if old.exists():
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return path


def read_checkpoint_config(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not (path / CONFIG_FILE).is_file() or not (path / MODEL_FILE).is_file():
        raise InputError(
            f"no checkpoint at {path}: expected {CONFIG_FILE} and {MODEL_FILE} inside; "
            "pass a folder written by `densa train` or `densa demo`"
        )
    try:
        return json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise InputError(f"checkpoint config {path / CONFIG_FILE} is not valid JSON: {err}") from None


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> Transformer:
    """Build the model described by a checkpoint and load its weights."""
    path = Path(path)
    config = ModelConfig.from_dict(read_checkpoint_config(path)["model"])
    model = Transformer(config)
    try:
        weights = load_file(path / MODEL_FILE, device=str(device))
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise InputError(f"cannot read weights {path / MODEL_FILE}: {err}") from None
    model.load_state_dict(weights)
    return model.to(device)


def load_trainer_state(path: str | os.PathLike) -> dict[str, Any] | None:
    """Return the optimizer/scheduler/step/RNG state saved with a checkpoint, or None."""
    file = Path(path) / TRAINER_FILE
    if not file.is_file():
        return None
    return torch.load(file, map_location="cpu", weights_only=True)
