"""A flat retrieval index: unit embeddings [N, E] with a label for each row.

Search is one matrix product and a top-k, exact and fast enough for tens of
thousands of items on a CPU. Files are safetensors, with the labels stored as
JSON in the header metadata.

Legend: N indexed items, Q queries, E embedding dim, k results per query.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from densa.io import InputError, atomic_path


class RetrievalIndex:
    """Embeddings [N, E] (L2-normalised on construction) and their labels."""

    def __init__(self, embeddings: torch.Tensor, labels: list[str], kind: str = ""):
        if embeddings.dim() != 2 or embeddings.shape[0] != len(labels):
            raise ValueError(
                f"embeddings have shape {tuple(embeddings.shape)} but there are {len(labels)} labels; "
                "pass one [E] row per label"
            )
        self.embeddings = F.normalize(embeddings.float(), dim=-1)
        self.labels = list(labels)
        self.kind = kind

    def __len__(self) -> int:
        return len(self.labels)

    @torch.no_grad()
    def search(self, queries: torch.Tensor, k: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (cosine scores, row ids), each [Q, k], best first, for queries [Q, E]."""
        if queries.dim() == 1:
            queries = queries[None]
        if queries.shape[-1] != self.embeddings.shape[-1]:
            raise ValueError(
                f"queries have dim {queries.shape[-1]} but the index has dim {self.embeddings.shape[-1]}; "
                "embed them with the model that built the index"
            )
        scores = F.normalize(queries.float(), dim=-1) @ self.embeddings.T  # [Q, N]
        return scores.topk(min(k, len(self)), dim=-1)

    def save(self, path: str | Path) -> None:
        metadata = {"labels": json.dumps(self.labels, ensure_ascii=False), "kind": self.kind}
        with atomic_path(path) as tmp:
            save_file({"embeddings": self.embeddings.contiguous()}, str(tmp), metadata=metadata)

    @classmethod
    def load(cls, path: str | Path) -> "RetrievalIndex":
        path = Path(path)
        if not path.is_file():
            raise InputError(f"index not found: {path}; build it with `densa align search --rebuild-index`")
        try:
            tensors = load_file(str(path))
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
            labels = json.loads(metadata["labels"])
        except (SafetensorError, KeyError, json.JSONDecodeError, OSError) as err:
            raise InputError(f"invalid index file {path} ({err}); rebuild it with --rebuild-index") from None
        return cls(tensors["embeddings"], labels, metadata.get("kind", ""))
