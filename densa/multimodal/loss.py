"""InfoNCE losses for cross-modal contrastive learning.

Legend: B queries, K keys (positives and negatives), E embedding dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def info_nce(
    queries: torch.Tensor,
    keys: torch.Tensor,
    targets: torch.Tensor,
    temperature: float | torch.Tensor,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Return the mean InfoNCE loss of queries [B, E] against keys [K, E].

    Query b's positive is keys[targets[b]]; every other key is a negative.
    The loss is cross-entropy over the logits q . k / temperature. Where
    `key_mask` [B, K] is False, that key is left out of query b's softmax
    (used to drop queued copies of the query's own item).
    """
    logits = queries @ keys.T / temperature  # [B, K]
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask, float("-inf"))
    return F.cross_entropy(logits, targets)


def symmetric_info_nce(
    text: torch.Tensor,
    image: torch.Tensor,
    image_keys: torch.Tensor,
    text_keys: torch.Tensor,
    targets: torch.Tensor,
    temperature: float | torch.Tensor,
    image_key_mask: torch.Tensor | None = None,
    text_key_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the text-to-image and image-to-text InfoNCE losses.

    Text queries [B, E] are scored against image keys, image queries against
    text keys; `targets` [B] indexes each query's positive in its key set.
    The training loss is the mean of the two.
    """
    t2i = info_nce(text, image_keys, targets, temperature, image_key_mask)
    i2t = info_nce(image, text_keys, targets, temperature, text_key_mask)
    return t2i, i2t
