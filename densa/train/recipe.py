"""From documents to a trained checkpoint: the steps `densa train` and `densa demo` share."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from densa.data.corpus import train_val_split
from densa.data.packing import pack_documents
from densa.data.tokenizer import DensaTokenizer
from densa.density import DensityAnalyzer, DensityConfig
from densa.model.config import ModelConfig
from densa.model.llama import Transformer
from densa.train.trainer import Trainer, TrainConfig, TrainResult

logger = logging.getLogger(__name__)


@dataclass
class PreparedData:
    tokenizer: DensaTokenizer
    train: object  # PackedDataset: tokens [S, T + 1], density [S, T + 1]
    val: object


def prepare_data(
    documents: list,
    seq_len: int,
    vocab_size: int = 4096,
    val_fraction: float = 0.1,
    seed: int = 0,
    analyzer_config: DensityConfig | None = None,
    cache_dir: str | Path | None = None,
) -> PreparedData:
    """Split documents, train a byte-level BPE on the training split and pack both splits.

    Domain terms of the analyser's dictionaries become single tokens, and the
    same analyser config scores the packed tokens.
    """
    if len(documents) < 2:
        raise ValueError(
            f"need at least 2 documents to hold one out for validation, got {len(documents)}; "
            "pass a folder or a .jsonl file with several documents"
        )
    train_docs, val_docs = train_val_split(documents, val_fraction, seed)
    logger.info("documents: %d train, %d held out", len(train_docs), len(val_docs))
    domain_terms = DensityAnalyzer(analyzer_config).domain_terms if analyzer_config else []
    tokenizer = DensaTokenizer.train([d.text for d in train_docs], vocab_size, domain_terms=domain_terms)
    train = pack_documents(train_docs, tokenizer, seq_len, cache_dir=cache_dir, analyzer_config=analyzer_config)
    val = pack_documents(val_docs, tokenizer, seq_len, cache_dir=cache_dir, analyzer_config=analyzer_config)
    if len(val.tokens) == 0:
        raise ValueError(
            f"held-out documents are shorter than one sequence of {seq_len + 1} tokens; "
            "use a shorter --seq-len or more text"
        )
    logger.info("packed %d train and %d held-out sequences of %d tokens", len(train.tokens), len(val.tokens), seq_len)
    return PreparedData(tokenizer, train, val)


def train_model(
    model_config: ModelConfig,
    train_config: TrainConfig,
    data: PreparedData,
    out_dir: str | Path | None,
    resume: str | Path | None = None,
) -> TrainResult:
    torch.manual_seed(train_config.seed)
    model = Transformer(model_config)
    logger.info("model: %.2fM parameters, %s attention", model.num_params() / 1e6, model_config.attention)
    trainer = Trainer(model, data.train, train_config, data.val, out_dir, data.tokenizer.to_json())
    if resume is not None:
        trainer.resume(resume)
    return trainer.fit()
