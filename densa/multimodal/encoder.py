"""One transformer, shared weights, for both text tokens and image patches.

Text enters through a token embedding, images through a strided-convolution
patch embedding. A learned modality embedding, added to every position, marks
which kind of input the shared blocks see. Attention is bidirectional (no
causal mask), and padded text positions are masked out as keys and left out
of the mean pool.

Legend: B batch, T tokens (text tokens or image patches), C model dim,
P patch size in pixels, S image side in pixels, E embedding dim.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from densa.config import DictConfig
from densa.model.config import ModelConfig
from densa.model.llama import AttentionContext, RMSNorm, TransformerBlock, rope_frequencies

TEXT, IMAGE = 0, 1  # rows of the modality embedding


@dataclass(frozen=True)
class AlignConfig(DictConfig):
    """The shared encoder and the two projection heads.

    `text_head_dim` and `image_head_dim` are the hidden widths of the
    per-modality projection heads; both heads end in the common `embed_dim`
    space. Images are `image_size` pixels square, cut into `patch_size`
    patches; captions are cut to `max_text_len` tokens.
    """

    vocab_size: int = 8192
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int = 4
    ffn_dim: int = 688
    max_text_len: int = 32
    image_size: int = 32
    patch_size: int = 4
    channels: int = 3
    text_head_dim: int = 768
    image_head_dim: int = 1024
    embed_dim: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        positive = (
            "vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_text_len", "image_size",
            "patch_size", "channels", "text_head_dim", "image_head_dim", "embed_dim",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} is invalid; use a positive integer")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}; "
                "pick sizes that tile the image"
            )
        # The block config checks heads, head dim parity and the rest.
        self.block_config()

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def block_config(self) -> ModelConfig:
        """Build the decoder config whose TransformerBlocks the encoder reuses, with dense attention."""
        return ModelConfig(
            vocab_size=self.vocab_size, dim=self.dim, n_layers=self.n_layers, n_heads=self.n_heads,
            n_kv_heads=self.n_kv_heads, ffn_dim=self.ffn_dim, max_seq_len=max(self.max_text_len, self.n_patches),
            rope_theta=self.rope_theta, norm_eps=self.norm_eps, attention="dense",
        )



def tiny(vocab_size: int = 2048, **changes) -> AlignConfig:
    """About 0.8M parameters (2K vocabulary): a useful emoji model in about a minute on 2 CPU cores."""
    values = dict(vocab_size=vocab_size, dim=128, n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=256,
                  max_text_len=24, image_size=32, patch_size=8, text_head_dim=256, image_head_dim=384,
                  embed_dim=128)
    return AlignConfig(**{**values, **changes})


def small(vocab_size: int = 8192, **changes) -> AlignConfig:
    """About 6M parameters (8K vocabulary) with the default 768/1024 head widths."""
    return AlignConfig(vocab_size=vocab_size, **changes)


PRESETS = {"tiny": tiny, "small": small}


class SharedEncoder(nn.Module):
    """Encode text [B, T] or images [B, channels, S, S] into pooled features [B, C] with one set of blocks."""

    def __init__(self, config: AlignConfig):
        super().__init__()
        self.config = config
        block_config = config.block_config()
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.patch_embed = nn.Conv2d(config.channels, config.dim, kernel_size=config.patch_size,
                                     stride=config.patch_size)
        self.modality_embed = nn.Embedding(2, config.dim)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(block_config) for i in range(config.n_layers)})
        self.norm = RMSNorm(config.dim, config.norm_eps)
        # Image patches get 1-D RoPE positions in raster order.
        self.register_buffer(
            "freqs",
            rope_frequencies(block_config.head_dim, block_config.max_seq_len, config.rope_theta),
            persistent=False,
        )
        self.init_weights()

    def init_weights(self) -> None:
        for name, param in self.named_parameters():
            if param.dim() >= 2:
                std = 0.02
                if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
                    std /= math.sqrt(2 * self.config.n_layers)
                nn.init.normal_(param, mean=0.0, std=std)
            elif name == "patch_embed.bias":
                nn.init.zeros_(param)

    def encode_text(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Pool text tokens [B, T] with mask [B, T] (True at real tokens) into features [B, C]."""
        if tokens.shape[1] > self.config.max_text_len:
            raise ValueError(
                f"text of {tokens.shape[1]} tokens exceeds max_text_len={self.config.max_text_len}; "
                "truncate it or raise max_text_len"
            )
        h = self.tok_embeddings(tokens) + self.modality_embed.weight[TEXT]
        return self._encode(h, mask)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pool images [B, channels, S, S] (float, normalised) into features [B, C]."""
        S = self.config.image_size
        if pixels.shape[1:] != (self.config.channels, S, S):
            raise ValueError(
                f"images have shape {tuple(pixels.shape[1:])}; this encoder expects "
                f"{(self.config.channels, S, S)}, so resize them first"
            )
        h = self.patch_embed(pixels)  # [B, C, S/P, S/P]
        h = h.flatten(2).transpose(1, 2)  # [B, T, C], raster order
        h = h + self.modality_embed.weight[IMAGE]
        return self._encode(h, None)

    def _encode(self, h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, T, C = h.shape
        # AttentionContext.decode_mask [B, T_keys] is broadcast over every query
        # row, which makes it a key-padding mask for bidirectional attention.
        context = AttentionContext("dense", causal=False, decode_mask=mask)
        freqs = self.freqs[:T]
        for layer in self.layers.values():
            h = layer(h, freqs, context)
        h = self.norm(h)
        if mask is None:
            return h.mean(dim=1)
        weights = mask.to(h.dtype).unsqueeze(-1)  # [B, T, 1]
        return (h * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
