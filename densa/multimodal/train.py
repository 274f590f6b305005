"""Training, evaluation and checkpoints for cross-modal alignment.

Data parallelism: when torch.distributed is initialised (torchrun sets the
environment, the caller calls init_process_group), train_align wraps the
ContrastiveAligner in DistributedDataParallel. Every rank draws the same
global batch of `batch_size` pairs from an identically seeded sampler and
trains on its contiguous shard of batch_size / W pairs, so W ranks see the
same data in the same order as one process with the whole batch. Gradients
cross ranks in two places only: DDP's all-reduce, which averages parameter
gradients over ranks, and, for the in-batch method, the all_gather of
embeddings (see densa.multimodal.moco). Each rank's loss is the mean over its
own queries, so the average over ranks equals the one-process loss and
gradient. The EMA key encoder (and in_batch's weight average) needs no
collective: each rank applies the same update to the same averaged parameters.

The learning rate warms up linearly, then decays in steps: it is multiplied by
`decay_factor` every `decay_every` steps (counted from step 0). For large runs
the documented setting is lr 1e-4 decayed by 0.1 every 100,000 steps.

Legend: B batch (per rank), W world size, T tokens, N images, Nc captions, E embedding dim.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from densa.data.tokenizer import DensaTokenizer
from densa.io import InputError
from densa.multimodal.data import LANGS, CaptionTokens, PairDataset, PairSampler, to_pixels
from densa.multimodal.encoder import AlignConfig
from densa.multimodal.heads import AlignModel
from densa.multimodal.metrics import chance_levels, matching_accuracy, retrieval_metrics
from densa.multimodal.moco import ContrastConfig, ContrastiveAligner, momentum_update, rank_and_world_size

logger = logging.getLogger(__name__)

CHECKPOINT_FILES = ("model.safetensors", "config.json", "tokenizer.json")


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation schedule and batch. `langs` picks which caption languages training draws from.

    `batch_size` is the global batch: under data parallelism each of the W
    ranks trains on batch_size / W pairs of it.
    """

    steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-4
    warmup_steps: int = 100
    decay_every: int = 100_000
    decay_factor: float = 0.1
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 100
    langs: tuple[str, ...] = LANGS

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "decay_every", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} is invalid; use a positive integer")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps={self.warmup_steps!r} is invalid; use an integer >= 0")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr} is invalid; use a positive learning rate such as 1e-4")
        if not 0 < self.decay_factor <= 1:
            raise ValueError(f"decay_factor={self.decay_factor} is invalid; use a value in (0, 1], such as 0.1")
        if self.weight_decay < 0 or self.grad_clip <= 0:
            raise ValueError("weight_decay must be >= 0 and grad_clip positive")
        object.__setattr__(self, "langs", tuple(self.langs))
        unknown = [lang for lang in self.langs if lang not in LANGS]
        if not self.langs or unknown:
            raise ValueError(f"langs={self.langs} is invalid; choose from {LANGS}")


def lr_factor(step: int, config: TrainConfig) -> float:
    """Return the multiplier of config.lr at `step`: linear warmup, then x decay_factor every decay_every steps."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    return config.decay_factor ** (step // config.decay_every)


@dataclass
class TrainResult:
    """The trained model, its EMA key encoder (momentum method only), the loss per step and throughput.

    `average_model` is an EMA of the trained weights with decay `ContrastConfig.momentum`: the EMA key
    encoder for moco_queue, and a copy kept only for evaluation for in_batch. `aligner` is the objective
    that trained the model, containing the queues of the momentum method.
    """

    model: AlignModel
    momentum_model: AlignModel | None = None
    aligner: ContrastiveAligner | None = None
    average_model: AlignModel | None = None
    losses: list[float] = field(default_factory=list)
    images_per_s: float = 0.0


def local_shard(batch_size: int) -> slice:
    """Return this rank's rows of a global batch: a contiguous block of batch_size / W rows, in rank order.

    Raises InputError when the batch does not split evenly, because all_gather
    needs the same local batch size on every rank.
    """
    rank, world_size = rank_and_world_size()
    if batch_size % world_size:
        raise InputError(
            f"batch size {batch_size} does not split evenly over {world_size} processes; use a multiple of "
            f"{world_size}, because every process needs the same number of pairs"
        )
    local = batch_size // world_size
    return slice(rank * local, (rank + 1) * local)


def train_align(
    model: AlignModel,
    contrast: ContrastConfig,
    config: TrainConfig,
    dataset: PairDataset,
    tokens: CaptionTokens,
    on_step: Callable[[int], None] | None = None,
) -> TrainResult:
    """Train `model` in place on `dataset` with the contrastive objective; return it with the loss curve.

    `tokens` contains the tokenised captions of `dataset`. `on_step(step)`, if
    given, runs after each optimizer step (step counts from 0). Batches are moved to
    the device of `model`'s parameters. Under an initialised process group the
    call is collective: every rank must call it with the same arguments, and
    it runs data-parallel as the module docstring describes. The returned
    losses are the global batch's loss on every rank.
    """
    rank, world_size = rank_and_world_size()
    shard = local_shard(config.batch_size)
    device = next(model.parameters()).device
    torch.manual_seed(config.seed)
    aligner = ContrastiveAligner(model, contrast).to(device)
    average_model = aligner.momentum_model
    if average_model is None:
        # in_batch has no key encoder, so it keeps the same weight average, updated after each step.
        average_model = copy.deepcopy(model).requires_grad_(False)
    trainer: torch.nn.Module = aligner
    if world_size > 1:
        # Buffers (queues, a fixed temperature) change identically on every
        # rank, so the per-step broadcast from rank 0 would only cost time.
        trainer = torch.nn.parallel.DistributedDataParallel(
            aligner, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False,
        )
    # Every rank draws the same global batch and keeps its own shard.
    sampler = PairSampler(dataset, tokens, config.batch_size, config.langs, seed=config.seed)
    decay, no_decay = [], []
    for param in aligner.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr, betas=(0.9, 0.98),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config))

    result = TrainResult(model, aligner.momentum_model, aligner, average_model)
    model.train()
    start = time.perf_counter()
    window_start, window_images = start, 0
    for step in range(config.steps):
        batch = [part[shard].to(device) for part in sampler.next_batch()]  # tokens, mask, pixels, item ids
        loss, stats = trainer(*batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # After backward, DDP has averaged the gradients, so every rank clips the same norm.
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        scheduler.step()
        if aligner.momentum_model is None:
            momentum_update(model, average_model, contrast.momentum)
        if on_step is not None:
            on_step(step)

        global_loss = loss.detach()
        if world_size > 1:
            # For the log only: the mean of the ranks' losses is the global batch's loss.
            dist.all_reduce(global_loss)
            global_loss /= world_size
        result.losses.append(global_loss.item())
        window_images += config.batch_size
        if rank == 0 and ((step + 1) % config.log_every == 0 or step + 1 == config.steps):
            now = time.perf_counter()
            logger.info(
                "step %d/%d loss %.4f (rank 0: t2i %.4f, i2t %.4f) grad norm %.3f lr %.2e temperature %.3f "
                "images/s %.0f",
                step + 1, config.steps, result.losses[-1], stats["loss_t2i"], stats["loss_i2t"], grad_norm.item(),
                scheduler.get_last_lr()[0], stats["temperature"], window_images / max(now - window_start, 1e-9),
            )
            window_start, window_images = now, 0
    result.images_per_s = config.steps * config.batch_size / max(time.perf_counter() - start, 1e-9)
    model.eval()
    result.average_model.eval()
    return result


@torch.no_grad()
def embed_images(model: AlignModel, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Return unit embeddings [N, E] of uint8 images [N, 3, S, S]."""
    parts = [model.embed_image(to_pixels(images[i : i + batch_size])) for i in range(0, len(images), batch_size)]
    return torch.cat(parts) if parts else torch.empty(0, model.config.embed_dim)


@torch.no_grad()
def embed_captions(model: AlignModel, tokens: CaptionTokens, rows: torch.Tensor | None = None,
                   batch_size: int = 256) -> torch.Tensor:
    """Return unit embeddings [Nc, E] of the tokenised captions `rows` (default: all)."""
    rows = torch.arange(len(tokens.ids)) if rows is None else rows
    parts = []
    for i in range(0, len(rows), batch_size):
        ids, mask = tokens.batch(rows[i : i + batch_size])
        parts.append(model.embed_text(ids, mask))
    return torch.cat(parts) if parts else torch.empty(0, model.config.embed_dim)


@torch.no_grad()
def evaluate(model: AlignModel, dataset: PairDataset, tokens: CaptionTokens, n_candidates: int = 10,
             langs: tuple[str, ...] | None = None) -> dict[str, dict[str, float]]:
    """Return, per caption language, Recall@1/5/10 both ways, matching accuracy and their chance levels.

    Matching accuracy uses `n_candidates` captions per image, or fewer when
    the data set is too small (the number used is stored as `n_candidates`).
    """
    model.eval()
    image_embeddings = embed_images(model, dataset.images)  # [N, E]
    results = {}
    for lang in langs or tuple(dataset.languages()):
        images, _, caption_image = dataset.view(lang)
        if len(images) < 2:
            raise InputError(f"only {len(images)} {lang!r} image to evaluate; retrieval needs at least 2")
        rows = torch.tensor([c for c, caption_lang in enumerate(dataset.caption_lang) if caption_lang == lang])
        similarity = embed_captions(model, tokens, rows) @ image_embeddings[images].T  # [Nc, n]
        metrics = retrieval_metrics(similarity, caption_image)
        # Small data sets may not have n_candidates - 1 captions of other images for every image.
        most_captions = int(torch.bincount(caption_image).max())
        candidates = min(n_candidates, len(rows) - most_captions + 1)
        metrics["match_acc"] = matching_accuracy(similarity, caption_image, candidates)
        metrics["n_images"] = len(images)
        metrics["n_captions"] = len(rows)
        metrics["n_candidates"] = candidates
        metrics["chance"] = chance_levels(caption_image, len(images), candidates)
        results[lang] = metrics
    return results


# -- checkpoints -------------------------------------------------------------------------------------------------


def save_checkpoint(directory: str | os.PathLike, model: AlignModel, tokenizer: DensaTokenizer,
                    extra: dict) -> None:
    """Write model.safetensors, config.json and tokenizer.json into `directory`, all at once.

    The files are written into a temporary sibling folder that then replaces
    `directory` by rename, so a reader never sees a mix of old and new files
    (during the swap the folder is absent for an instant). Index files built
    for the old checkpoint are dropped with it.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
        save_file(state, str(staging / "model.safetensors"))
        tokenizer.save(staging / "tokenizer.json")
        config = {"model": model.config.to_dict(), **extra}
        (staging / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
        _apply_umask(staging)
        if directory.exists():
            if not (directory / "config.json").is_file():
                raise InputError(f"{directory} exists and is not a densa align checkpoint; choose another --out")
            old = directory.with_name(f".{directory.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(directory, old)
            os.replace(staging, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _apply_umask(directory: Path) -> None:
    # mkdtemp and mkstemp create owner-only entries; give the checkpoint the usual permissions.
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for file in directory.iterdir():
        file.chmod(0o666 & ~umask)


def load_checkpoint(directory: str | os.PathLike) -> tuple[AlignModel, DensaTokenizer, dict]:
    """Load a checkpoint written by save_checkpoint; return (model in eval mode, tokenizer, config dict)."""
    directory = Path(directory)
    missing = [name for name in CHECKPOINT_FILES if not (directory / name).is_file()]
    if missing:
        raise InputError(
            f"checkpoint {directory} is missing {', '.join(missing)}; pass a folder written by `densa align train`"
        )
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
        model_config = AlignConfig.from_dict(config["model"])
        state = load_file(str(directory / "model.safetensors"))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, SafetensorError, OSError) as err:
        raise InputError(f"invalid checkpoint {directory}: {err}") from None
    model = AlignModel(model_config)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise InputError(f"checkpoint {directory} does not match its config: {err}") from None
    tokenizer = DensaTokenizer.load(directory / "tokenizer.json")
    model.eval()
    return model, tokenizer, config
