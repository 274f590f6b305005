"""Byte-level BPE tokenizer trained with HF `tokenizers`, plus single-token domain terms.

Byte-level BPE never meets an unknown character: text is mapped to its UTF-8
bytes first, so a Chinese character the training corpus never showed is still
encoded (as up to 3 byte tokens) and decodes back exactly.

Offsets are character offsets into the encoded string, and a token's offset is
the smallest character span that contains all of its bytes. A token holding only
part of a multi-byte character therefore gets the span of the whole character:
the three byte tokens of "区" in "区块" all get (0, 1). BPE merges can also cross
a character boundary: in " —" a token made of the space and the first two bytes
of "—" gets (0, 2), and the token holding the last byte gets (1, 2). Spans never
leave gaps, but they can overlap.

Domain terms (for example finance vocabulary) are added after training as
non-special added tokens, which the tokenizer matches before BPE runs, so each
occurrence becomes exactly one token.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterable, Sequence

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from densa.io import InputError, atomic_path, read_text_file

logger = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN)
# The 256 byte tokens and the special tokens always exist, and BPE merges fill the rest.
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)


def _clean_terms(terms: Iterable[str]) -> list[str]:
    """Strip, drop empty and duplicate terms, keeping first-seen order."""
    seen: dict[str, None] = {}
    for term in terms:
        if not isinstance(term, str):
            raise ValueError(f"domain term {term!r} is a {type(term).__name__}; pass strings")
        term = term.strip()
        if term in SPECIAL_TOKENS:
            raise ValueError(f"domain term {term!r} is a special token; remove it from the list")
        if term:
            seen.setdefault(term, None)
    return list(seen)


def _added_token(term: str) -> AddedToken:
    # A Latin term must not match inside a longer word ("NPL" in "UNPLANNED"), so
    # it only matches as a whole word. Chinese has no word boundaries, so other
    # terms match anywhere.
    whole_word = term[0].isascii() and term[0].isalnum() and term[-1].isascii() and term[-1].isalnum()
    return AddedToken(term, single_word=whole_word, normalized=False)


class DensaTokenizer:
    """Byte-level BPE tokenizer with <|endoftext|> and <|pad|> special tokens.

    Text that contains the literal string "<|endoftext|>" is encoded as plain
    text, so a document cannot inject a document boundary. Only the packing code
    inserts `eos_id`.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        missing = [token for token in SPECIAL_TOKENS if tokenizer.token_to_id(token) is None]
        if missing:
            raise ValueError(
                f"tokenizer lacks the special tokens {missing}; train it with DensaTokenizer.train"
            )
        # Not stored in tokenizer.json, so it is set on every construction.
        tokenizer.encode_special_tokens = True
        self._tokenizer = tokenizer

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int = 4096,
        domain_terms: Iterable[str] = (),
        min_frequency: int = 2,
    ) -> DensaTokenizer:
        """Train byte-level BPE on `texts`, then add each domain term as one token.

        `vocab_size` is the maximum size of the final vocabulary, counting the
        byte tokens, the special tokens and the domain terms. BPE is trained to
        `vocab_size - len(domain_terms)` entries. Terms that BPE already encodes as
        one token are not added again, so the result can be smaller than
        `vocab_size`, and so can a corpus too small to fill it.
        """
        terms = _clean_terms(domain_terms)
        bpe_size = vocab_size - len(terms)
        if bpe_size < MIN_VOCAB_SIZE:
            raise ValueError(
                f"vocab_size={vocab_size} leaves {bpe_size} entries for BPE after {len(terms)} "
                f"domain terms; use vocab_size >= {MIN_VOCAB_SIZE + len(terms)} or fewer terms"
            )
        if min_frequency < 1:
            raise ValueError(f"min_frequency={min_frequency} is invalid; use an integer >= 1")

        texts = [text for text in texts if text]
        if not texts:
            raise InputError("no training text for the tokenizer; pass at least one non-empty text")

        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=bpe_size,
            min_frequency=min_frequency,
            special_tokens=list(SPECIAL_TOKENS),
            # All 256 bytes enter the vocabulary even if the corpus lacks some, so
            # any input encodes.
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))

        result = cls(tokenizer)
        added = result.add_domain_terms(terms)
        logger.info(
            "trained byte-level BPE on %d texts: %d tokens (%d domain terms added)",
            len(texts), result.vocab_size, added,
        )
        return result

    def add_domain_terms(self, terms: Iterable[str]) -> int:
        """Add each term as a single token unless it already encodes to one; return how many were added."""
        new_terms = [term for term in _clean_terms(terms) if len(self.encode(term)[0]) != 1]
        if not new_terms:
            return 0
        return self._tokenizer.add_tokens([_added_token(term) for term in new_terms])

    # -- encoding ------------------------------------------------------------

    def encode(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Encode text to token ids and their (start, end) character offsets."""
        encoding = self._tokenizer.encode(text, add_special_tokens=False)
        return encoding.ids, encoding.offsets

    def encode_batch(self, texts: Sequence[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
        """Encode several texts in parallel (HF tokenizers' Rust thread pool)."""
        encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return [(encoding.ids, encoding.offsets) for encoding in encodings]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Decode ids to text; special tokens appear as their text unless skipped."""
        return self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included; every id is below it."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def eos_id(self) -> int:
        return self._tokenizer.token_to_id(EOS_TOKEN)

    @property
    def pad_id(self) -> int:
        return self._tokenizer.token_to_id(PAD_TOKEN)

    # -- persistence ---------------------------------------------------------

    def to_json(self) -> str:
        """Return the tokenizer.json text: the full vocabulary, merges and added tokens."""
        return self._tokenizer.to_str()

    def save(self, path: str | os.PathLike) -> None:
        """Write tokenizer.json to `path` atomically."""
        with atomic_path(path) as tmp:
            tmp.write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def load(cls, path: str | os.PathLike) -> DensaTokenizer:
        """Load a tokenizer.json written by `save`."""
        path = Path(path)
        text = read_text_file(path)
        try:
            tokenizer = Tokenizer.from_str(text)
        except Exception as err:  # tokenizers raises a bare Exception for bad JSON
            raise InputError(
                f"invalid tokenizer file {path}: {err}; pass a tokenizer.json written by DensaTokenizer.save"
            ) from None
        try:
            return cls(tokenizer)
        except ValueError as err:
            raise InputError(f"invalid tokenizer file {path}: {err}") from None

    def __repr__(self) -> str:
        return f"DensaTokenizer(vocab_size={self.vocab_size})"
