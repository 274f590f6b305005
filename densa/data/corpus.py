"""The built-in training corpus, document-level splits, and the shared long-document data.

The built-in corpus is the Python Language Reference text that CPython ships as
`pydoc_data.topics` (79 topics, 465K characters in CPython 3.11.7), so a
fresh install can train a tokenizer and a tiny model with no downloads.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Sequence

from densa.data.readers import Document


def builtin_corpus() -> list[Document]:
    """Return one document per `pydoc_data.topics` topic, sorted by topic name."""
    from pydoc_data.topics import topics

    return [
        Document(text=topics[name], source=f"pydoc_data.topics:{name}", meta={"topic": name})
        for name in sorted(topics)
        if topics[name].strip()
    ]


def train_val_split(
    docs: Sequence[Document], val_fraction: float = 0.1, seed: int = 0
) -> tuple[list[Document], list[Document]]:
    """Split documents (never inside a document) into train and validation lists.

    The validation set gets round(len(docs) * val_fraction) documents, at least
    one when val_fraction > 0 and never all of them, chosen by a seeded shuffle. Both lists keep the
    input order, so the same inputs and seed always give the same split.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} is invalid; use a value in [0, 1)")
    if val_fraction == 0.0:
        return list(docs), []
    if len(docs) < 2:
        raise ValueError(
            f"cannot split {len(docs)} document(s) into train and validation; "
            "pass at least 2 documents or val_fraction=0"
        )

    n_val = min(len(docs) - 1, max(1, round(len(docs) * val_fraction)))
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    val_ids = set(order[:n_val])
    train = [doc for i, doc in enumerate(docs) if i not in val_ids]
    val = [doc for i, doc in enumerate(docs) if i in val_ids]
    return train, val


def longdoc_path() -> Path | None:
    """Return ../shared/data/longdoc next to the repository root, or None when absent.

    Only a source checkout has it. Tests and benchmarks use it, but no library
    code requires it.
    """
    repo_root = Path(__file__).resolve().parents[2]
    path = repo_root.parent / "shared" / "data" / "longdoc"
    return path if path.is_dir() else None
