"""Retrieval metrics for paired embeddings.

Similarity matrices are [Nc, Ni], with one row per caption and one column per
image. `caption_image` [Nc] gives the column of each caption's image, and an
image may have several captions. Ties count against the correct item, so a constant
similarity matrix scores at or below chance.
"""

from __future__ import annotations

import math
import statistics

import torch


def _check(similarity: torch.Tensor, caption_image: torch.Tensor) -> None:
    if similarity.dim() != 2 or similarity.shape[0] != caption_image.shape[0]:
        raise ValueError(
            f"similarity has shape {tuple(similarity.shape)} but there are {caption_image.shape[0]} captions; "
            "pass [captions, images]"
        )
    if caption_image.numel() and (caption_image.min() < 0 or caption_image.max() >= similarity.shape[1]):
        raise ValueError(f"caption_image must index the {similarity.shape[1]} image columns")


def text_to_image_ranks(similarity: torch.Tensor, caption_image: torch.Tensor) -> torch.Tensor:
    """Return [Nc]: how many images other than the right one score at least as high for each caption."""
    _check(similarity, caption_image)
    correct = similarity.gather(1, caption_image[:, None])  # [Nc, 1]
    return (similarity >= correct).sum(dim=1) - 1


def image_to_text_ranks(similarity: torch.Tensor, caption_image: torch.Tensor) -> torch.Tensor:
    """Return [Ni]: how many wrong captions score at least as high as the image's best right caption."""
    _check(similarity, caption_image)
    scores = similarity.T  # [Ni, Nc]
    Ni = scores.shape[0]
    own = caption_image[None, :] == torch.arange(Ni, device=scores.device)[:, None]  # [Ni, Nc]
    if not bool(own.any(dim=1).all()):
        raise ValueError("every image needs at least one caption for image-to-text retrieval")
    best_own = scores.masked_fill(~own, float("-inf")).max(dim=1, keepdim=True).values  # [Ni, 1]
    return ((scores >= best_own) & ~own).sum(dim=1)


def retrieval_metrics(
    similarity: torch.Tensor, caption_image: torch.Tensor, ks: tuple[int, ...] = (1, 5, 10)
) -> dict[str, float]:
    """Return Recall@k in both directions as fractions, keyed `r{k}_t2i` and `r{k}_i2t`."""
    t2i = text_to_image_ranks(similarity, caption_image)
    i2t = image_to_text_ranks(similarity, caption_image)
    metrics = {}
    for k in ks:
        metrics[f"r{k}_t2i"] = (t2i < k).float().mean().item()
        metrics[f"r{k}_i2t"] = (i2t < k).float().mean().item()
    return metrics


def matching_accuracy(
    similarity: torch.Tensor, caption_image: torch.Tensor, n_candidates: int = 10, seed: int = 0
) -> float:
    """Return the fraction of images whose right caption scores highest among `n_candidates` captions.

    Each image is scored against its first caption and n_candidates - 1
    captions of other images, drawn with a fixed seed, so chance is
    1 / n_candidates.
    """
    _check(similarity, caption_image)
    Nc, Ni = similarity.shape
    if n_candidates < 2:
        raise ValueError(f"n_candidates={n_candidates} is invalid; use 2 or more")
    generator = torch.Generator().manual_seed(seed)
    correct = 0
    for image in range(Ni):
        own = (caption_image == image).nonzero().flatten()
        others = (caption_image != image).nonzero().flatten()
        if len(own) == 0:
            raise ValueError(f"image {image} has no caption; every image needs one")
        if len(others) < n_candidates - 1:
            raise ValueError(
                f"only {len(others)} captions of other images for n_candidates={n_candidates}; "
                "lower n_candidates or evaluate more pairs"
            )
        wrong = others[torch.randperm(len(others), generator=generator)[: n_candidates - 1]]
        right_score = similarity[own[0], image]
        correct += int(bool((similarity[wrong, image] < right_score).all()))
    return correct / Ni


def chance_levels(
    caption_image: torch.Tensor, n_images: int, n_candidates: int, ks: tuple[int, ...] = (1, 5, 10)
) -> dict[str, float]:
    """Return the expected Recall@k (both ways) and matching accuracy of random similarity scores."""
    n_captions = len(caption_image)
    counts = torch.bincount(caption_image, minlength=n_images).tolist()
    levels = {}
    for k in ks:
        levels[f"r{k}_t2i"] = min(k / n_images, 1.0)
        # An image misses only when the top k of the n_captions captions are all other images' captions.
        levels[f"r{k}_i2t"] = statistics.fmean(
            1.0 - math.comb(n_captions - count, k) / math.comb(n_captions, k) if k <= n_captions else 1.0
            for count in counts
        )
    levels["match_acc"] = 1.0 / n_candidates
    return levels
