"""Data: document readers, the built-in corpus, the BPE tokenizer and sequence packing."""

from densa.data.corpus import builtin_corpus, longdoc_path, train_val_split
from densa.data.packing import PackedDataset, pack_documents
from densa.data.readers import (
    Document,
    read_annual_report,
    read_documents,
    read_govreport,
    read_vcsum,
)
from densa.data.tokenizer import DensaTokenizer

__all__ = [
    "DensaTokenizer",
    "Document",
    "PackedDataset",
    "builtin_corpus",
    "longdoc_path",
    "pack_documents",
    "read_annual_report",
    "read_documents",
    "read_govreport",
    "read_vcsum",
    "train_val_split",
]
