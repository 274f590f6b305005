"""Single-process training: AdamW, warmup then cosine decay, clipping, checkpoints, exact resume.

The loop is split into pieces the parallel engine reuses: `build_optimizer`,
`build_scheduler`, `batch_indices` (a pure function of seed and step, so the
data position is just the step) and `token_loss` (a sum plus a token count, so
data-parallel workers with unequal batches still average exactly).

Legend: B batch, T tokens, V vocabulary, S packed sequences.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from densa.model.llama import Transformer
from densa.train.checkpoint import load_trainer_state, save_checkpoint

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and bookkeeping settings. Learning rates are per step; intervals are in steps."""

    steps: int = 200
    batch_size: int = 8
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    dtype: str = "fp32"
    seed: int = 0
    eval_every: int = 0
    eval_batches: int = 8
    ckpt_every: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} is invalid; use a positive integer")
        for name in ("warmup_steps", "eval_every", "ckpt_every", "eval_batches"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} is invalid; use 0 or more")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr} is invalid; use a positive learning rate such as 1e-3")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio={self.min_lr_ratio} is invalid; use a value in [0, 1]")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip={self.grad_clip} is invalid; use 0 (off) or a positive norm")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is invalid; choose one of {sorted(DTYPES)}")
        object.__setattr__(self, "betas", tuple(self.betas))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def build_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms or biases)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas)


def lr_factor(step: int, config: TrainConfig) -> float:
    """Linear warmup to 1, then cosine decay to `min_lr_ratio` at the last step."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    decay_steps = max(config.steps - config.warmup_steps, 1)
    progress = min((step - config.warmup_steps) / decay_steps, 1.0)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return config.min_lr_ratio + (1.0 - config.min_lr_ratio) * cosine


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config))


def batch_indices(step: int, n_sequences: int, batch_size: int, seed: int) -> torch.Tensor:
    """Sequence indices of the batch at `step`: epochs of seeded permutations, read in order.

    A pure function of its arguments, so resuming at step s reads exactly the
    batches the uninterrupted run would have read.
    """
    start = step * batch_size
    out = []
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n_sequences)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        perm = torch.randperm(n_sequences, generator=generator)
        take = min(batch_size - len(out), n_sequences - offset)
        out.extend(perm[offset : offset + take].tolist())
    return torch.tensor(out)


def token_loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Return (summed cross-entropy, token count) for logits [B, T, V] and targets [B, T]."""
    loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum")
    return loss, targets.numel()


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory in MiB: allocator peak on CUDA, the process's peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # ru_maxrss is KiB on Linux and bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def split_batch(tokens: torch.Tensor, density: torch.Tensor | None):
    """Packed rows of T + 1 tokens -> inputs [B, T], targets [B, T], input densities [B, T]."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    return inputs, targets, None if density is None else density[:, :-1]


@torch.no_grad()
def evaluate(model: Transformer, dataset, config: TrainConfig, device: torch.device) -> float:
    """Held-out perplexity over the first `eval_batches` batches of `dataset` (all if 0)."""
    model.eval()
    total_loss, total_tokens = 0.0, 0
    n = len(dataset.tokens)
    n_batches = -(-n // config.batch_size)
    if config.eval_batches:
        n_batches = min(n_batches, config.eval_batches)
    for b in range(n_batches):
        rows = slice(b * config.batch_size, min((b + 1) * config.batch_size, n))
        inputs, targets, density = split_batch(dataset.tokens[rows], dataset.density[rows])
        with torch.autocast(device.type, dtype=DTYPES[config.dtype], enabled=config.dtype != "fp32"):
            logits = model(inputs.to(device), density=density.to(device))
        loss, count = token_loss(logits, targets.to(device))
        total_loss += float(loss)
        total_tokens += count
    model.train()
    return math.exp(total_loss / total_tokens)


@dataclass
class TrainResult:
    step: int
    losses: list[float]
    val_ppl: float | None
    tokens_per_s: float
    peak_mem_mb: float


class Trainer:
    """Train a Transformer on a packed dataset (`tokens` [S, T + 1], `density` [S, T + 1])."""

    def __init__(
        self,
        model: Transformer,
        train_data,
        config: TrainConfig,
        val_data=None,
        out_dir: str | Path | None = None,
        tokenizer_json: str | None = None,
        device: str | torch.device = "cpu",
    ):
        if len(train_data.tokens) == 0:
            raise ValueError("training data contains no sequences; use more text or a shorter --seq-len")
        self.model = model.to(device)
        self.train_data = train_data
        self.val_data = val_data
        self.config = config
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.tokenizer_json = tokenizer_json
        self.device = torch.device(device)
        self.optimizer = build_optimizer(self.model, config)
        self.scheduler = build_scheduler(self.optimizer, config)
        self.step = 0
        self.losses: list[float] = []

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "losses": torch.tensor(self.losses, dtype=torch.float64),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng_cpu": torch.get_rng_state(),
        }

    def save(self, path: Path) -> None:
        save_checkpoint(path, self.model, self.config.to_dict(), self.state_dict(), self.tokenizer_json)

    def resume(self, path: str | Path) -> None:
        """Load model, optimizer, scheduler, step and RNG state from a checkpoint folder."""
        from densa.train.checkpoint import load_model

        state = load_trainer_state(path)
        if state is None:
            raise ValueError(f"checkpoint {path} has no trainer state; it cannot be resumed")
        self.model.load_state_dict(load_model(path).state_dict())
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        self.losses = state["losses"].tolist()
        torch.set_rng_state(state["rng_cpu"])

    def train_step(self) -> tuple[float, float, int]:
        """Run one optimisation step; return (mean loss, grad norm before clipping, tokens)."""
        config = self.config
        rows = batch_indices(self.step, len(self.train_data.tokens), config.batch_size, config.seed)
        inputs, targets, density = split_batch(self.train_data.tokens[rows], self.train_data.density[rows])
        inputs, targets, density = inputs.to(self.device), targets.to(self.device), density.to(self.device)

        with torch.autocast(self.device.type, dtype=DTYPES[config.dtype], enabled=config.dtype != "fp32"):
            logits = self.model(inputs, density=density)
        loss_sum, count = token_loss(logits, targets)
        loss = loss_sum / count
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        max_norm = config.grad_clip if config.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return float(loss.detach()), float(grad_norm), count

    def fit(self, until: int | None = None) -> TrainResult:
        """Train from the current step up to step `until` (default: config.steps).

        Stopping early still leaves a resumable checkpoint when `out_dir` is set;
        the schedule always follows config.steps.
        """
        config = self.config
        until = config.steps if until is None else min(until, config.steps)
        if self.step == 0:
            torch.manual_seed(config.seed)
        self.model.train()
        tokens_seen, train_time = 0, 0.0
        bar = tqdm(total=config.steps, initial=self.step, disable=not config.progress, desc="train",
                   unit="step", dynamic_ncols=True, leave=False)
        val_ppl = None
        while self.step < until:
            lr = self.optimizer.param_groups[0]["lr"]
            start = time.perf_counter()
            loss, grad_norm, count = self.train_step()
            elapsed = time.perf_counter() - start
            tokens_seen += count
            train_time += elapsed
            self.losses.append(loss)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")
            logger.info(
                "step %d | loss %.4f | grad norm %.3f | lr %.2e | %.0f tokens/s | peak mem %.0f MiB",
                self.step, loss, grad_norm, lr, count / elapsed, peak_memory_mb(self.device),
            )

            if config.eval_every and self.val_data is not None and self.step % config.eval_every == 0:
                val_ppl = evaluate(self.model, self.val_data, config, self.device)
                logger.info("step %d | val ppl %.2f", self.step, val_ppl)
            if config.ckpt_every and self.out_dir is not None and self.step % config.ckpt_every == 0:
                self.save(self.out_dir / "checkpoint")
        bar.close()

        if self.val_data is not None:
            val_ppl = evaluate(self.model, self.val_data, config, self.device)
            logger.info("final | val ppl %.2f", val_ppl)
        if self.out_dir is not None:
            self.save(self.out_dir / "checkpoint")
        tokens_per_s = tokens_seen / train_time if train_time else 0.0
        return TrainResult(self.step, self.losses, val_ppl, tokens_per_s, peak_memory_mb(self.device))
