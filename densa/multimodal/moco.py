"""Momentum contrast across modalities, and the in-batch (CLIP-style) baseline.

The momentum method keeps an exponential moving average (EMA) copy of the
encoder and heads. That copy encodes the keys, and one FIFO queue per modality
stores the keys of earlier batches as extra negatives. Text queries are scored
against image keys and image queries against text keys (symmetric InfoNCE).

Collectives under data parallelism (both methods work unchanged when
torch.distributed is not initialised or the world size is 1). Each rank's
loss is the mean over its own B queries, whose positives sit at rows
rank * B .. rank * B + B - 1 of the gathered keys.
- moco_queue gathers the EMA keys and item ids with gather_no_grad
  (torch.distributed.all_gather, outside autograd). The gathered keys, in
  rank order, serve as negatives in this step and then enter the queue, so
  every rank has the same queue. No gradient crosses ranks here: keys come
  from the EMA copy under no_grad, and queries stay local.
- in_batch gathers text and image embeddings with gather_with_grad
  (torch.distributed.nn.functional.all_gather). Its backward sends every
  rank's gradient for a block back to the rank that produced it and sums them
  (as of torch 2.13: an all_to_all then a sum on gloo, a reduce_scatter on
  NCCL). Rank r's parameter gradient is therefore the sum over ranks s of
  dL_s / d(params) through rank r's embeddings. Item ids are gathered with
  gather_no_grad.
- DistributedDataParallel, applied by densa.multimodal.train, all-reduces and
  averages the parameter gradients. With equal local batches the average of
  the per-rank losses is the one-process loss over all W * B pairs, so the
  averaged gradient equals the one-process gradient in both methods.
Every rank must use the same local batch size, because all_gather needs
equal shapes.

Legend: B local batch, W world size, K queue size, E embedding dim.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from densa.multimodal.heads import AlignModel
from densa.multimodal.loss import symmetric_info_nce

METHODS = ("moco_queue", "in_batch")


@dataclass(frozen=True)
class ContrastConfig:
    """The contrastive objective.

    `method` is "moco_queue" (EMA key encoder plus a queue of `queue_size`
    negatives per modality) or "in_batch" (negatives are the other pairs of
    the batch only). `momentum` is the EMA decay of the key encoder.
    """

    method: str = "moco_queue"
    queue_size: int = 16384
    momentum: float = 0.995
    temperature: float = 0.1
    learn_temperature: bool = False

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r} is invalid; choose one of {METHODS}")
        if not isinstance(self.queue_size, int) or self.queue_size < 1:
            raise ValueError(f"queue_size={self.queue_size!r} is invalid; use a positive integer")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum={self.momentum} is invalid; use a value in [0, 1), such as 0.995")
        if not 0.0 < self.temperature <= 1.0:
            raise ValueError(f"temperature={self.temperature} is invalid; use a value in (0, 1], such as 0.1")


class EmbeddingQueue(nn.Module):
    """A FIFO ring buffer of unit vectors [K, E] with the item id of each.

    Ids let the loss drop queued keys of the query's own item, which a small
    data set revisits while its older keys are still queued. Empty slots have
    id -1. `keys()` and `ids()` return only the filled slots.
    """

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.size = size
        self.register_buffer("key_buffer", torch.zeros(size, dim))
        self.register_buffer("id_buffer", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, ids: torch.Tensor) -> None:
        """Write keys [n, E] over the oldest entries; when n > K only the newest K are kept."""
        keys, ids = keys[-self.size :], ids[-self.size :]
        n = keys.shape[0]
        slots = (self.ptr + torch.arange(n, device=self.ptr.device)) % self.size
        self.key_buffer[slots] = keys.to(self.key_buffer.dtype)
        self.id_buffer[slots] = ids
        self.ptr.copy_((self.ptr + n) % self.size)
        self.filled.clamp_(max=self.size - n).add_(n)

    def keys(self) -> torch.Tensor:
        # Slots fill from 0 upwards, so the filled ones are a prefix.
        return self.key_buffer[: int(self.filled)]

    def ids(self) -> torch.Tensor:
        return self.id_buffer[: int(self.filled)]

    def ordered(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (keys, ids) of the filled slots from oldest to newest."""
        if int(self.filled) < self.size:
            return self.keys(), self.ids()
        shift = -int(self.ptr)
        return self.key_buffer.roll(shift, dims=0), self.id_buffer.roll(shift, dims=0)


@torch.no_grad()
def momentum_update(online: nn.Module, target: nn.Module, momentum: float) -> None:
    """Set every target parameter to momentum * target + (1 - momentum) * online."""
    for target_param, online_param in zip(target.parameters(), online.parameters(), strict=True):
        target_param.mul_(momentum).add_(online_param.detach(), alpha=1.0 - momentum)


def rank_and_world_size() -> tuple[int, int]:
    """Return (rank, world size) of the default process group, or (0, 1) when none is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate x [B, ...] from every rank in rank order: [W * B, ...]. Carries no gradient."""
    _, world_size = rank_and_world_size()
    if world_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate x [B, ...] from every rank in rank order; gradients flow back to each rank's part."""
    _, world_size = rank_and_world_size()
    if world_size == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()))


def _own_item_mask(query_ids: torch.Tensor, key_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Return [B, K]: False where a key other than the positive belongs to the query's own item."""
    mask = key_ids[None, :] != query_ids[:, None]
    mask[torch.arange(len(targets), device=targets.device), targets] = True
    return mask


class ContrastiveAligner(nn.Module):
    """Wrap an AlignModel with the contrastive objective; `forward` returns the training loss."""

    def __init__(self, model: AlignModel, config: ContrastConfig):
        super().__init__()
        self.model = model
        self.config = config
        log_temperature = torch.tensor(math.log(config.temperature))
        if config.learn_temperature:
            self.log_temperature = nn.Parameter(log_temperature)
        else:
            self.register_buffer("log_temperature", log_temperature)
        self.momentum_model: AlignModel | None = None
        if config.method == "moco_queue":
            self.momentum_model = copy.deepcopy(model).requires_grad_(False)
            self.text_queue = EmbeddingQueue(config.queue_size, model.config.embed_dim)
            self.image_queue = EmbeddingQueue(config.queue_size, model.config.embed_dim)

    @property
    def temperature(self) -> torch.Tensor:
        # A learned temperature stays in [0.01, 1] so the logits cannot blow up.
        return self.log_temperature.exp().clamp(0.01, 1.0)

    def forward(
        self, tokens: torch.Tensor, mask: torch.Tensor, pixels: torch.Tensor, item_ids: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Return (loss, stats) for captions tokens/mask [B, T], images pixels and item ids [B]."""
        text = self.model.embed_text(tokens, mask)  # [B, E]
        image = self.model.embed_image(pixels)  # [B, E]
        if self.momentum_model is None:
            t2i, i2t = self._in_batch_losses(text, image, item_ids)
        else:
            t2i, i2t = self._queue_losses(text, image, tokens, mask, pixels, item_ids)
        loss = (t2i + i2t) / 2
        stats = {"loss_t2i": t2i.item(), "loss_i2t": i2t.item(), "temperature": self.temperature.item()}
        return loss, stats

    def _in_batch_losses(self, text, image, item_ids):
        rank, _ = rank_and_world_size()
        B = text.shape[0]
        all_text, all_image = gather_with_grad(text), gather_with_grad(image)  # [W * B, E]
        all_ids = gather_no_grad(item_ids)
        targets = rank * B + torch.arange(B, device=text.device)
        key_mask = _own_item_mask(item_ids, all_ids, targets)
        return symmetric_info_nce(
            text, image, all_image, all_text, targets, self.temperature, key_mask, key_mask
        )

    def _queue_losses(self, text, image, tokens, mask, pixels, item_ids):
        rank, _ = rank_and_world_size()
        B = text.shape[0]
        with torch.no_grad():
            # The key encoder moves first, then encodes this batch's keys.
            momentum_update(self.model, self.momentum_model, self.config.momentum)
            text_keys = gather_no_grad(self.momentum_model.embed_text(tokens, mask))  # [W * B, E]
            image_keys = gather_no_grad(self.momentum_model.embed_image(pixels))  # [W * B, E]
            key_ids = gather_no_grad(item_ids)  # [W * B]

        # Keys: this step's keys from every rank, then the queue: [W * B + filled, E].
        all_image_keys = torch.cat([image_keys, self.image_queue.keys()])
        all_text_keys = torch.cat([text_keys, self.text_queue.keys()])
        targets = rank * B + torch.arange(B, device=text.device)
        image_mask = _own_item_mask(item_ids, torch.cat([key_ids, self.image_queue.ids()]), targets)
        text_mask = _own_item_mask(item_ids, torch.cat([key_ids, self.text_queue.ids()]), targets)
        losses = symmetric_info_nce(
            text, image, all_image_keys, all_text_keys, targets, self.temperature, image_mask, text_mask
        )

        # Dequeue the oldest keys and enqueue this step's.
        self.image_queue.enqueue(image_keys, key_ids)
        self.text_queue.enqueue(text_keys, key_ids)
        return losses
