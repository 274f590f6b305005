"""Reference word statistics and domain dictionaries for the density analyser.

Two reference tables give each word a corpus frequency and an IDF:

* Chinese: jieba's bundled dictionary (`dict.txt`: word, count, part of speech;
  about 60M counted words) and jieba's IDF table (`analyse/idf.txt`), both read
  from the installed jieba package.
* English: word counts over CPython's `pydoc_data.topics` (the Language
  Reference topics, about 64K words in 79 topics), with each topic counted as
  one document for the IDF.

Both tables are built once per process and never modified. Domain dictionaries
are user term lists that the analyser adds to its own jieba segmenter.
"""

from __future__ import annotations

import functools
import importlib.resources
import logging
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from densa.io import read_text_file

logger = logging.getLogger(__name__)

# Add-k smoothing of reference counts: a word never seen counts as 0.5
# occurrences, so its surprisal is high but finite.
SMOOTHING = 0.5

HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff]")
# A number with three or more digits, a decimal point or a percent sign names
# one specific quantity, and neither table counts such numbers well (jieba
# lists few numbers, pydoc_data counts code literals). So such a number is
# scored as no more frequent than one in a million words. Short integers
# ("20") are common and keep their table surprisal.
NUMBER_SURPRISAL = math.log(1e6)
SPECIFIC_NUMBER = re.compile(r"^(?:\d[\d,]*\d{2}|\d[\d,]*[.:/]\d+|\d[\d.,]*%)$")
# Latin words (with inner apostrophes) and numbers, for counting the English corpus.
LATIN_OR_NUMBER = re.compile(r"[a-z]+(?:'[a-z]+)*|\d+(?:[.,]\d+)*")


@dataclass(frozen=True)
class ReferenceTable:
    """Word counts and IDF values of one reference corpus.

    `counts` maps a normalised word to its corpus count, and `idf` maps it to
    its inverse document frequency in nats (`default_idf` for words not in
    `idf`). Surprisals are in nats. With `char_backoff`, a word the table does
    not list is scored as the sequence of its characters (a unigram model over
    characters). Then a new word made of common characters, such as 这是 from
    jieba's HMM, is less surprising than a rare name.
    """

    name: str
    counts: dict[str, int]
    total: int
    idf: dict[str, float]
    default_idf: float
    max_idf: float
    char_backoff: bool = False

    def probability(self, word: str) -> float:
        return (self.counts.get(word, 0) + SMOOTHING) / (self.total + SMOOTHING * len(self.counts))

    @property
    def unknown_surprisal(self) -> float:
        """Surprisal of a word the table has never seen (before the number floor)."""
        return -math.log(SMOOTHING / (self.total + SMOOTHING * len(self.counts)))

    def surprisal(self, word: str) -> float:
        """Self-information -ln p(word) in nats, smoothed for unseen words."""
        if self.char_backoff and len(word) > 1 and not self.counts.get(word):
            by_chars = sum(-math.log(self.probability(ch)) for ch in word)
            return min(by_chars, self.unknown_surprisal)
        surprisal = -math.log(self.probability(word))
        if SPECIFIC_NUMBER.match(word):
            surprisal = max(surprisal, NUMBER_SURPRISAL)
        return surprisal

    def idf_fraction(self, word: str) -> float:
        """IDF divided by the table's largest IDF, in [0, 1]: 1 for the most topical words."""
        return min(self.idf.get(word, self.default_idf) / self.max_idf, 1.0)


def _jieba_file(*parts: str) -> Path:
    return Path(str(importlib.resources.files("jieba").joinpath(*parts)))


@functools.cache
def jieba_dictionary() -> tuple[dict[str, int], dict[str, str], int]:
    """Return (counts, part-of-speech tags, total count) of jieba's bundled dictionary."""
    counts: dict[str, int] = {}
    tags: dict[str, str] = {}
    path = _jieba_file("dict.txt")
    with path.open(encoding="utf-8") as f:
        for line in f:
            parts = line.split()
            if len(parts) < 2:
                continue
            counts[parts[0]] = int(parts[1])
            if len(parts) >= 3:
                tags[parts[0]] = parts[2]
    return counts, tags, sum(counts.values())


@functools.cache
def chinese_reference() -> ReferenceTable:
    """Build the Chinese table from jieba's dictionary counts and IDF table."""
    counts, _, total = jieba_dictionary()
    idf: dict[str, float] = {}
    with _jieba_file("analyse", "idf.txt").open(encoding="utf-8") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 2:
                idf[parts[0]] = float(parts[1])
    values = sorted(idf.values())
    # jieba's own TF-IDF gives unseen words the median IDF; do the same.
    median = values[len(values) // 2]
    return ReferenceTable("jieba", counts, total, idf, median, values[-1], char_backoff=True)


@functools.cache
def english_reference() -> ReferenceTable:
    """Build the English table from the Python Language Reference topics."""
    from pydoc_data import topics

    counts: Counter[str] = Counter()
    doc_freq: Counter[str] = Counter()
    docs = list(topics.topics.values())
    for doc in docs:
        words = LATIN_OR_NUMBER.findall(doc.lower())
        counts.update(words)
        doc_freq.update(set(words))

    # Smoothed IDF, ln((1 + D) / (1 + df)): an unseen word gets the largest value.
    n_docs = len(docs)
    idf = {w: math.log((1 + n_docs) / (1 + df)) for w, df in doc_freq.items()}
    max_idf = math.log(1 + n_docs)
    return ReferenceTable("pydoc_data.topics", dict(counts), sum(counts.values()), idf, max_idf, max_idf)


def reference_for(word: str) -> ReferenceTable:
    """Chinese table for words with a Han character, English table otherwise."""
    return chinese_reference() if HAN.search(word) else english_reference()


# Domain dictionary filter. Term lists harvested from the web (such as a
# banking lexicon) also hold institution names, book and document titles and
# long phrases; those would turn whole names into "terms". A kept term:
#   * has 2 to MAX_TERM_CHARS characters, only Han, Latin letters and digits,
#     and is not a bare number;
#   * does not end with an institution suffix or start with a title opener;
#   * is not a common word: its count in jieba's dictionary is at most
#     COMMON_WORD_COUNT (about 4,000 words of jieba 0.42.1 are above it), so
#     general business words in finance lists (发展, 公司, 市场) get no boost;
#   * is not a word that jieba tags as a verb, adverb, adjective or time word
#     (出台, 强化, 近期): domain terms are names of things.
MAX_TERM_CHARS = 8
COMMON_WORD_COUNT = 2000
TERM_CHARS = re.compile(r"^[\u4e00-\u9fffA-Za-z0-9]+$")
INSTITUTION_SUFFIXES = (
    "公司", "分行", "支行", "分理处", "营业部", "储蓄所", "信用社", "合作社", "事务所", "集团",
    "大学", "学院", "学校", "协会", "学会", "研究所", "研究院", "委员会", "管理局", "办公室",
    "中心", "旧址", "通知", "办法", "规定", "意见", "决定", "条例", "细则", "研究", "分析",
)
TITLE_PREFIXES = ("关于", "中国人民银行关于")
GENERAL_TAG_CLASSES = ("v", "d", "a", "t")


def keep_domain_term(term: str) -> bool:
    """Apply the domain dictionary filter described above."""
    if not 2 <= len(term) <= MAX_TERM_CHARS or not TERM_CHARS.match(term):
        return False
    if term.isdigit() or term.endswith(INSTITUTION_SUFFIXES) or term.startswith(TITLE_PREFIXES):
        return False
    counts, tags, _ = jieba_dictionary()
    if tags.get(term, "n")[0] in GENERAL_TAG_CLASSES:
        return False
    return counts.get(term, 0) <= COMMON_WORD_COUNT


@dataclass(frozen=True)
class DomainTerm:
    term: str
    tag: str | None  # part of speech from a jieba-format line, else None


def load_domain_terms(path: str | Path) -> tuple[list[DomainTerm], int]:
    """Read one term list; return (kept terms, count of lines the filter dropped).

    Accepted line formats: "term", "term<TAB>count" (THUOCL) and jieba's user
    dictionary "term freq pos". The count column is ignored because its meaning
    differs between lists (THUOCL counts documents in another corpus), and a
    third column is the term's part-of-speech tag. Lines starting with "#" are
    comments. A line that matches none of these is read as one term (which
    the filter drops when it contains spaces).
    """
    path = Path(path)
    text = read_text_file(path)
    kept: list[DomainTerm] = []
    dropped = 0
    seen: set[str] = set()
    for line in text.splitlines():
        parts = line.split()
        if not parts or parts[0].startswith("#"):
            continue
        tag = None
        if len(parts) >= 3 and parts[-2].isdigit():
            term, tag = " ".join(parts[:-2]), parts[-1]
        elif len(parts) == 2 and parts[1].isdigit():
            term = parts[0]
        else:
            # A term with inner spaces: kept whole, so the filter drops it.
            term = " ".join(parts)
        if term in seen:
            continue
        seen.add(term)
        if keep_domain_term(term):
            kept.append(DomainTerm(term, tag))
        else:
            dropped += 1
    logger.info("loaded %d domain terms from %s (%d filtered out)", len(kept), path, dropped)
    return kept, dropped
