"""Per-modality projection heads and the model that pairs them with the shared encoder.

Each modality has its own head, with a hidden width chosen per modality, and
both heads end in the same embedding space.

Legend: B batch, T tokens, C encoder dim, E embedding dim.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from densa.multimodal.encoder import AlignConfig, SharedEncoder


class ProjectionHead(nn.Module):
    """Linear, GELU, Linear into the common space, then L2 normalisation."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.fc2(F.gelu(self.fc1(x))), dim=-1)


class AlignModel(nn.Module):
    """The shared encoder plus one projection head per modality, returning unit vectors [B, E]."""

    def __init__(self, config: AlignConfig):
        super().__init__()
        self.config = config
        self.encoder = SharedEncoder(config)
        self.text_head = ProjectionHead(config.dim, config.text_head_dim, config.embed_dim)
        self.image_head = ProjectionHead(config.dim, config.image_head_dim, config.embed_dim)

    def embed_text(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.text_head(self.encoder.encode_text(tokens, mask))

    def embed_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.image_head(self.encoder.encode_image(pixels))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
