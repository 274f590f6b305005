"""Semantic density of every model token, from word statistics and syntax.

The analyser scores words, then maps word scores onto model tokens:

1. Segment and tag the text (`densa.density.syntax`): each word gets a role
   weight from its part of speech, the syntax signal `syn` in [0, 1].
2. Word-frequency signal: the self-information s = -ln p(word) of a word in
   nats against a reference corpus (`densa.density.lexicon`), plus a
   burstiness bonus for a word repeated in this document more often than its
   reference probability predicts, scaled by how topical the word is (its
   IDF as a fraction of the table's largest IDF):

       b    = max(0, ln(count / max(expected, 1)))   if count >= 2, else 0
       z    = s + burst_weight * idf_fraction * b / (1 + b)
       freq = sigmoid((z - center) / temperature)

   where `expected` = (words in the document) x p(word). The sigmoid is fixed,
   not fitted per document, so densities compare across documents. Both
   tables measure surprisal in nats, which keeps the two languages on one
   scale: the default center of 14 nats is a word with a probability of
   about 0.8 in a million.
3. Word density = frequency_weight * freq + syntax_weight * syn, raised to at
   least `domain_floor` for domain-dictionary terms.
4. Each model token takes the word of highest density among the words its
   character span overlaps (max, so a token that covers " the" or "的银"
   scores as its most informative part), and reports that word's signals.
   A token that overlaps no word (spaces, punctuation, special tokens with an
   empty span) gets `punctuation_weight` as density and syntax and 0 as
   frequency.

Legend: T model tokens, W words, L characters of the text.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from pathlib import Path

import jieba
import numpy as np
import torch

from densa.density.lexicon import HAN, jieba_dictionary, load_domain_terms, reference_for
from densa.density.syntax import JiebaRuleTagger, SyntaxTagger
from densa.io import InputError

WORD_CHAR = re.compile(r"[^\W_]")
# jieba count given to a domain term that jieba's dictionary lacks or counts
# lower: enough for the segmenter to keep the term whole rather than cut it
# into known words.
DOMAIN_TERM_COUNT = 100


@dataclass(frozen=True)
class DensityConfig:
    """Weights, squashing and domain dictionaries of the density analyser.

    `center` and `temperature` (nats) set the sigmoid of the frequency signal,
    and `burst_weight` (nats) the largest burstiness bonus. With the defaults,
    6-9% of tokens reach density >= 0.7 (the default `PlanConfig.threshold`)
    in 16K-token VCSum meetings and GovReport documents, and about 20% in the
    number-heavy pages of a bank's annual report.
    """

    frequency_weight: float = 0.5
    syntax_weight: float = 0.5
    burst_weight: float = 2.5
    center: float = 14.0
    temperature: float = 1.5
    punctuation_weight: float = 0.05
    domain_floor: float = 0.9
    domain_dicts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("frequency_weight", "syntax_weight", "punctuation_weight", "domain_floor"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}={value} is invalid; use a value in [0, 1]")
        total = self.frequency_weight + self.syntax_weight
        if not math.isclose(total, 1.0, abs_tol=1e-6):
            raise ValueError(
                f"frequency_weight + syntax_weight = {total} is invalid; the two weights must sum to 1"
            )
        if not self.burst_weight >= 0.0:
            raise ValueError(f"burst_weight={self.burst_weight} is invalid; use a value >= 0 (nats)")
        if not self.center > 0.0:
            raise ValueError(f"center={self.center} is invalid; use a surprisal > 0 in nats, such as 14")
        if not self.temperature > 0.0:
            raise ValueError(f"temperature={self.temperature} is invalid; use a value > 0 in nats, such as 1.5")
        if isinstance(self.domain_dicts, (str, Path)):
            raise ValueError(
                f"domain_dicts={self.domain_dicts!r} is invalid; pass a tuple of paths, such as (path,)"
            )
        object.__setattr__(self, "domain_dicts", tuple(str(p) for p in self.domain_dicts))
        for path in self.domain_dicts:
            if not Path(path).is_file():
                raise InputError(f"domain dictionary not found: {path}; check the path")


@dataclass
class DensityResult:
    """Per-token densities and the two signals behind them, plus the scored words."""

    density: torch.Tensor  # [T] float32 in [0, 1]
    frequency: torch.Tensor  # [T] word-frequency signal alone, in [0, 1]
    syntax: torch.Tensor  # [T] syntactic-role signal alone, in [0, 1]
    words: list[tuple[int, int, str, str, float]]  # (start, end, word, tag, word density)


@functools.cache
def _prefix_dict() -> tuple[dict[str, int], int]:
    """jieba's prefix dictionary (every word and, with count 0, its prefixes)."""
    counts, _, total = jieba_dictionary()
    freq = dict(counts)
    for word in counts:
        for i in range(1, len(word)):
            freq.setdefault(word[:i], 0)
    return freq, total


def _new_segmenter(terms: list[str]) -> jieba.Tokenizer:
    """Build a private jieba.Tokenizer with the bundled dictionary plus `terms`.

    The global `jieba.dt` is left untouched. NOTE: this sets the tokenizer's
    FREQ, total and initialized attributes directly, because `initialize()`
    would read the dictionary again. Checked against jieba 0.42.1 only.
    """
    base, total = _prefix_dict()
    segmenter = jieba.Tokenizer()
    segmenter.FREQ = dict(base) if terms else base
    segmenter.total = total
    segmenter.initialized = True
    for term in terms:
        segmenter.add_word(term, max(base.get(term, 0), DOMAIN_TERM_COUNT))
    return segmenter


@functools.cache
def _shared_segmenter() -> jieba.Tokenizer:
    # Analysers without domain terms never modify their segmenter, so they share one.
    return _new_segmenter([])


def _check_offsets(offsets, n_chars: int) -> np.ndarray:
    """Return offsets as an int64 array [T, 2], raising InputError on bad values."""
    try:
        array = np.asarray(offsets, dtype=np.int64)
    except (TypeError, ValueError, OverflowError):
        raise InputError(
            "offsets must be a list of (start, end) integer pairs, as tokenizers' Encoding.offsets gives"
        ) from None
    if array.size == 0:
        return array.reshape(0, 2)
    if array.ndim != 2 or array.shape[1] != 2:
        raise InputError(
            f"offsets has shape {array.shape}; pass a list of (start, end) pairs, one per token"
        )
    bad = (array[:, 0] < 0) | (array[:, 0] > array[:, 1]) | (array[:, 1] > n_chars)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise InputError(
            f"offsets[{i}] = {tuple(array[i].tolist())} is out of range for a text of {n_chars} "
            "characters; each pair must satisfy 0 <= start <= end <= len(text)"
        )
    return array


def _range_argmax(values: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Index of the max of values[s:e] for each (s, e) with e > s, via a sparse table.

    Levels go up to the longest range only, so short tokens keep this cheap.
    """
    # table[k][i] = argmax of values[i : i + 2**k]
    lengths = ends - starts
    table = [np.arange(values.size)]
    while (1 << len(table)) <= lengths.max():
        prev, half = table[-1], 1 << (len(table) - 1)
        left, right = prev[:-half], prev[half:]
        table.append(np.where(values[right] > values[left], right, left))

    level = np.floor(np.log2(lengths)).astype(np.int64)
    result = np.empty(starts.size, dtype=np.int64)
    for k in np.unique(level):
        rows = np.flatnonzero(level == k)
        left = table[k][starts[rows]]
        right = table[k][ends[rows] - (1 << k)]
        result[rows] = np.where(values[right] > values[left], right, left)
    return result


class DensityAnalyzer:
    """Scores each model token's semantic density in [0, 1].

    `tagger` replaces the default jieba + rules tagger; it must return word
    spans as `SyntaxTagger.tag` documents. Domain terms from
    `config.domain_dicts` are filtered (see `densa.density.lexicon`), added
    to a private jieba segmenter and listed in `domain_terms`.
    """

    def __init__(self, config: DensityConfig | None = None, tagger: SyntaxTagger | None = None):
        self.config = config or DensityConfig()
        terms: dict[str, str | None] = {}
        for path in self.config.domain_dicts:
            kept, _ = load_domain_terms(path)
            for entry in kept:
                terms.setdefault(entry.term, entry.tag)
        self.domain_terms: list[str] = list(terms)
        self._domain_keys = {t.lower() for t in terms}

        if tagger is None:
            segmenter = _new_segmenter(self.domain_terms) if terms else _shared_segmenter()
            # A term new to jieba's dictionary keeps its list's tag, or else "nz" (other proper noun).
            _, known_tags, _ = jieba_dictionary()
            extra = {t: tag or "nz" for t, tag in terms.items() if t not in known_tags}
            tagger = JiebaRuleTagger(segmenter, extra)
        if not isinstance(tagger, SyntaxTagger):
            raise ValueError(f"tagger={tagger!r} is invalid; pass an object with a tag(text) method")
        self.tagger = tagger

    def score_words(self, text: str, spans) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Return (frequency [W], syntax [W], density [W]) for tagged word spans."""
        cfg = self.config
        keys = []
        is_word = np.zeros(len(spans), dtype=bool)
        syntax = np.empty(len(spans), dtype=np.float64)
        for i, (start, end, weight, _) in enumerate(spans):
            word = text[start:end]
            keys.append(word if HAN.search(word) else word.lower())
            is_word[i] = bool(WORD_CHAR.search(word))
            syntax[i] = weight

        # Surprisal and burstiness once per distinct word.
        n_words = int(is_word.sum())
        counts: dict[str, int] = {}
        for key, ok in zip(keys, is_word):
            if ok:
                counts[key] = counts.get(key, 0) + 1
        z_of: dict[str, float] = {}
        for key, count in counts.items():
            table = reference_for(key)
            burst = 0.0
            if count >= 2:
                expected = max(n_words * table.probability(key), 1.0)
                burst = max(0.0, math.log(count / expected))
            bonus = cfg.burst_weight * table.idf_fraction(key) * burst / (1.0 + burst)
            z_of[key] = table.surprisal(key) + bonus

        z = np.array([z_of.get(k, 0.0) for k in keys], dtype=np.float64)
        frequency = 1.0 / (1.0 + np.exp(-(z - cfg.center) / cfg.temperature))
        frequency = np.where(is_word, frequency, 0.0)
        syntax = np.where(is_word, syntax, cfg.punctuation_weight)
        density = cfg.frequency_weight * frequency + cfg.syntax_weight * syntax
        if self._domain_keys:
            domain = np.array([k in self._domain_keys for k in keys], dtype=bool)
            density = np.where(domain & is_word, np.maximum(density, cfg.domain_floor), density)
        density = np.where(is_word, density, cfg.punctuation_weight)
        return frequency, syntax, np.clip(density, 0.0, 1.0)

    def analyze(self, text: str, offsets: list[tuple[int, int]] | None = None) -> DensityResult:
        """Score every token of `text`; `offsets` are the tokens' (start, end) character spans.

        offsets=None means one token per character (useful for tests and for
        char-level views).
        """
        if not isinstance(text, str):
            raise InputError(f"text must be a str, got {type(text).__name__}; decode bytes to str first")
        n_chars = len(text)
        if offsets is None:
            token_spans = np.stack([np.arange(n_chars), np.arange(1, n_chars + 1)], axis=1)
        else:
            token_spans = _check_offsets(offsets, n_chars)

        spans = self.tagger.tag(text)
        starts = np.array([s[0] for s in spans], dtype=np.int64)
        ends = np.array([s[1] for s in spans], dtype=np.int64)
        weights = np.array([s[2] for s in spans], dtype=np.float64)
        if spans and (
            (starts < 0).any() or (ends > n_chars).any() or (ends <= starts).any()
            or (starts[1:] < ends[:-1]).any()
        ):
            raise ValueError(
                f"tagger {type(self.tagger).__name__} returned overlapping, unordered or "
                "out-of-range spans; a SyntaxTagger must return ordered, disjoint spans within the text"
            )
        if spans and not ((weights >= 0.0) & (weights <= 1.0)).all():
            raise ValueError(
                f"tagger {type(self.tagger).__name__} returned role weights outside [0, 1]; "
                "a SyntaxTagger must return weights in [0, 1]"
            )
        frequency, syntax, density = self.score_words(text, spans)
        words = [
            (int(s), int(e), text[s:e], tag, float(d))
            for (s, e, _, tag), d in zip(spans, density)
        ]

        # Unit W is "no word" (spaces, punctuation); char_unit [L] is the word at each character.
        n_words = len(spans)
        unit_density = np.append(density, self.config.punctuation_weight)
        unit_frequency = np.append(frequency, 0.0)
        unit_syntax = np.append(syntax, self.config.punctuation_weight)
        chars = np.arange(n_chars)
        owner = np.searchsorted(starts, chars, side="right") - 1
        inside = (owner >= 0) & (chars < ends[owner.clip(min=0)] if n_words else False)
        char_unit = np.where(inside, owner, n_words)

        # Each token takes the highest-density word among its characters.
        token_unit = np.full(len(token_spans), n_words, dtype=np.int64)
        nonempty = np.flatnonzero(token_spans[:, 1] > token_spans[:, 0]) if len(token_spans) else []
        if len(nonempty):
            char_density = unit_density[char_unit]
            best_char = _range_argmax(char_density, token_spans[nonempty, 0], token_spans[nonempty, 1])
            token_unit[nonempty] = char_unit[best_char]

        def to_tensor(values: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(values[token_unit].astype(np.float32))

        return DensityResult(
            density=to_tensor(unit_density),
            frequency=to_tensor(unit_frequency),
            syntax=to_tensor(unit_syntax),
            words=words,
        )
