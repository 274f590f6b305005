"""Pack documents into fixed-length training sequences with per-token densities.

Each document is tokenized and scored once (density in [0, 1] per token), an
<|endoftext|> token follows every document, and the concatenated stream is cut
into S windows of T + 1 tokens: window i starts at token i * T, so consecutive
windows share one token and every next-token pair of the stream, except in the
dropped tail, is trained on exactly once. Inputs are window[:-1], targets
window[1:].

Legend: S sequences, T tokens per training sequence (seq_len).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset

from densa.data.readers import Document
from densa.data.tokenizer import DensaTokenizer
from densa.io import InputError, atomic_path

logger = logging.getLogger(__name__)

# Maps (text, character offsets per token) to a float tensor [n_tokens] in [0, 1].
DensityFn = Callable[[str, list[tuple[int, int]]], Any]

# Bump when the packing layout changes, so old cache files are never reused.
CACHE_FORMAT = 1
# <|endoftext|> separates documents and carries no content of its own.
EOS_DENSITY = 0.0


class PackedDataset(Dataset):
    """Packed sequences: `tokens` int64 [S, T + 1] and `density` float32 [S, T + 1].

    Item i is a dict with `inputs` and `targets` (int64 [T], targets shifted by
    one) and `density` (float32 [T], the densities of the input tokens).
    """

    def __init__(self, tokens: torch.Tensor, density: torch.Tensor) -> None:
        if tokens.dim() != 2 or tokens.size(1) < 2 or tokens.dtype != torch.int64:
            raise ValueError(
                f"tokens must be int64 [S, seq_len + 1] with seq_len >= 1, got {tokens.dtype} {list(tokens.shape)}"
            )
        if density.shape != tokens.shape or density.dtype != torch.float32:
            raise ValueError(
                f"density must be float32 {list(tokens.shape)} like tokens, got {density.dtype} {list(density.shape)}"
            )
        self.tokens = tokens
        self.density = density

    @property
    def seq_len(self) -> int:
        return self.tokens.size(1) - 1

    def __len__(self) -> int:
        return self.tokens.size(0)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        window = self.tokens[index]  # [T + 1]
        return {"inputs": window[:-1], "targets": window[1:], "density": self.density[index, :-1]}


def _config_fingerprint(config: Any) -> str:
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        fields = dataclasses.asdict(config)
        return f"{type(config).__qualname__}:{json.dumps(fields, sort_keys=True, default=str)}"
    return repr(config)


def _resolve_density(
    density_fn: DensityFn | None, analyzer_config: Any, density_key: str | None
) -> tuple[DensityFn, str]:
    """Return the density function and the string that identifies it in cache keys."""
    if density_fn is not None:
        if analyzer_config is not None:
            raise ValueError("pass either density_fn or analyzer_config, not both")
        # NOTE: without density_key a function is known by its qualified name only,
        # so two lambdas, or a changed function body, share cache entries.
        name = getattr(density_fn, "__qualname__", None) or type(density_fn).__qualname__
        module = getattr(density_fn, "__module__", None) or type(density_fn).__module__
        return density_fn, density_key or f"{module}.{name}"

    # Imported here so that reading and tokenizing never pay for the analyser's
    # dictionaries.
    from densa.density.analyzer import DensityAnalyzer

    analyzer = DensityAnalyzer(analyzer_config)
    # The config names domain dictionaries by path, so the loaded terms are hashed
    # too: editing a dictionary file changes the key.
    terms = hashlib.sha256("\n".join(analyzer.domain_terms).encode()).hexdigest()
    key = density_key or f"DensityAnalyzer:{_config_fingerprint(analyzer.config)}:terms={terms}"
    return (lambda text, offsets: analyzer.analyze(text, offsets).density), key


def cache_key(docs: Sequence[Document], tokenizer: DensaTokenizer, seq_len: int, density_key: str) -> str:
    """Hash everything the packed tensors depend on into a hex digest."""
    digest = hashlib.sha256()
    header = {"format": CACHE_FORMAT, "seq_len": seq_len, "density": density_key, "docs": len(docs)}
    digest.update(json.dumps(header, sort_keys=True).encode())
    digest.update(hashlib.sha256(tokenizer.to_json().encode()).digest())
    for doc in docs:
        data = doc.text.encode("utf-8")
        # Length-prefixed so that ["ab", "c"] and ["a", "bc"] hash differently.
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def _document_density(density_fn: DensityFn, doc: Document, offsets: list[tuple[int, int]]) -> torch.Tensor:
    density = torch.as_tensor(density_fn(doc.text, offsets), dtype=torch.float32).reshape(-1)
    if density.numel() != len(offsets):
        raise ValueError(
            f"density function returned {density.numel()} values for {len(offsets)} tokens "
            f"of the document from {doc.source}; it must return one value per token"
        )
    if not bool(((density >= 0) & (density <= 1)).all()):
        raise ValueError(
            f"density function returned values outside [0, 1] for the document from {doc.source}"
        )
    return density


def _pack(
    docs: Sequence[Document], tokenizer: DensaTokenizer, seq_len: int, density_fn: DensityFn
) -> PackedDataset:
    id_parts: list[torch.Tensor] = []
    density_parts: list[torch.Tensor] = []
    eos = torch.tensor([tokenizer.eos_id], dtype=torch.int64)
    eos_density = torch.tensor([EOS_DENSITY], dtype=torch.float32)
    encodings = tokenizer.encode_batch([doc.text for doc in docs])
    for doc, (ids, offsets) in zip(docs, encodings):
        if not ids:
            continue
        id_parts += [torch.tensor(ids, dtype=torch.int64), eos]
        density_parts += [_document_density(density_fn, doc, offsets), eos_density]

    stream = torch.cat(id_parts) if id_parts else torch.empty(0, dtype=torch.int64)
    stream_density = torch.cat(density_parts) if density_parts else torch.empty(0)
    n_seq = (stream.numel() - 1) // seq_len
    if n_seq < 1:
        raise InputError(
            f"the documents contain {stream.numel()} tokens (with separators), fewer than "
            f"seq_len + 1 = {seq_len + 1}; pass more text or a smaller seq_len"
        )

    # [N] -> [S, T + 1] windows with stride T. The tail that fills no window is dropped.
    tokens = stream.unfold(0, seq_len + 1, seq_len)[:n_seq].contiguous()
    density = stream_density.unfold(0, seq_len + 1, seq_len)[:n_seq].contiguous()
    dropped = stream.numel() - (n_seq * seq_len + 1)
    logger.info(
        "packed %d documents into %d sequences of %d tokens (%d tokens in all, %d dropped at the end)",
        len(docs), n_seq, seq_len, stream.numel(), dropped,
    )
    return PackedDataset(tokens, density)


def _load_cached(path: Path, seq_len: int) -> PackedDataset | None:
    try:
        tensors = load_file(str(path))
        dataset = PackedDataset(tensors["tokens"], tensors["density"])
    except (SafetensorError, OSError, KeyError, ValueError) as err:
        logger.warning("ignoring unreadable packing cache %s (%s); rebuilding it", path, err)
        return None
    if dataset.seq_len != seq_len:
        logger.warning("packing cache %s has seq_len %d, expected %d; rebuilding it", path, dataset.seq_len, seq_len)
        return None
    return dataset


def pack_documents(
    docs: Sequence[Document],
    tokenizer: DensaTokenizer,
    seq_len: int,
    cache_dir: str | os.PathLike | None = None,
    *,
    density_fn: DensityFn | None = None,
    analyzer_config: Any = None,
    density_key: str | None = None,
) -> PackedDataset:
    """Tokenize, score and pack documents into sequences of `seq_len` + 1 tokens.

    Densities come from `densa.density.DensityAnalyzer(analyzer_config)` unless
    `density_fn(text, offsets)` is given. With `cache_dir`, the result is stored
    as safetensors under a key that hashes the document texts, the tokenizer JSON,
    `seq_len` and the density source. The density source is `density_key` if
    given, else the analyser config and domain terms, else the function's
    qualified name. A later call with the same inputs loads the file without
    tokenizing or scoring again.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len} is invalid; use a positive number of tokens")
    if not docs:
        raise InputError("no documents to pack; pass at least one document")

    fn, key_source = _resolve_density(density_fn, analyzer_config, density_key)
    path = None
    if cache_dir is not None:
        key = cache_key(docs, tokenizer, seq_len, key_source)
        path = Path(cache_dir) / f"packed-{key[:40]}.safetensors"
        if path.is_file():
            dataset = _load_cached(path, seq_len)
            if dataset is not None:
                logger.info("loaded %d packed sequences from cache %s", len(dataset), path)
                return dataset

    dataset = _pack(docs, tokenizer, seq_len, fn)
    if path is not None:
        with atomic_path(path) as tmp:
            save_file(
                {"tokens": dataset.tokens, "density": dataset.density},
                str(tmp),
                metadata={"format": str(CACHE_FORMAT), "seq_len": str(seq_len), "density": key_source[:1000]},
            )
        logger.info("wrote packing cache %s", path)
    return dataset
