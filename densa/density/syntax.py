"""Syntactic-role signal: word segmentation plus a weight per part of speech.

A `SyntaxTagger` turns text into word spans, each with a role weight in [0, 1]
and a tag: content words (names, numbers, nouns) weigh high, function words
(particles, conjunctions, determiners, fillers) weigh low. The analyser scores
word frequencies on the same spans, so the tagger also decides segmentation.
Any parser that returns such spans (a dependency parser, spaCy) can replace
the default `JiebaRuleTagger`.

`JiebaRuleTagger` handles Chinese, English and mixed text in one pass:

* Han runs (with Latin letters glued to them, as in "A股") are cut by a
  jieba segmenter with its HMM for new words. Each word takes its
  part-of-speech tag from jieba's dictionary (the tag column of `dict.txt`,
  the table `jieba.posseg` uses). We do not run `jieba.posseg`, because its
  HMM tagging took 0.49 s on a 25K-character meeting transcript, eight times
  the cut itself (jieba 0.42.1, one CPU core). That HMM only affects runs of
  characters missing from the dictionary: here jieba's segmentation HMM cuts
  them, and we tag the resulting words "un" and weight them as content words.
* Other runs are split by a regex into numbers and words. Words are tagged by
  closed-class lists (determiners, prepositions, conjunctions, pronouns,
  auxiliaries, fillers); a capitalised word that does not start a sentence, or
  an all-capital acronym, is tagged as a proper noun.
"""

from __future__ import annotations

import re
from typing import Protocol, runtime_checkable

import jieba

from densa.density.lexicon import jieba_dictionary

Span = tuple[int, int, float, str]  # (start, end, role weight, tag), character offsets


@runtime_checkable
class SyntaxTagger(Protocol):
    def tag(self, text: str) -> list[Span]:
        """Return word spans in text order, non-overlapping, with role weights in [0, 1].

        Characters outside every span (spaces, punctuation) count as punctuation.
        """
        ...


# Role weights of jieba's tag set (ICTCLAS-style). A tag missing here falls
# back to the weight of its first letter.
CHINESE_ROLE_WEIGHTS: dict[str, float] = {
    # proper nouns, numbers, abbreviations, Latin words in Chinese text
    "nr": 1.0, "ns": 1.0, "nt": 1.0, "nz": 1.0, "nrt": 1.0, "nrfg": 1.0,
    "m": 1.0, "mq": 0.9, "j": 0.9, "eng": 0.9,
    # nouns and nominal verbs/adjectives, time and place words
    "n": 0.75, "ng": 0.7, "nl": 0.75, "vn": 0.75, "an": 0.7, "t": 0.7, "s": 0.7,
    "un": 0.65,  # a word jieba's HMM found that the dictionary does not list
    # verbs, adjectives, idioms, distinguishing words
    "v": 0.55, "vd": 0.5, "vg": 0.5, "vi": 0.5, "vq": 0.5, "a": 0.5, "ad": 0.4,
    "ag": 0.5, "b": 0.6, "i": 0.6, "l": 0.6, "z": 0.45, "g": 0.5,
    # closed classes
    "q": 0.3, "f": 0.3, "d": 0.25, "dg": 0.25, "r": 0.15, "rr": 0.15, "rz": 0.15,
    "rg": 0.15, "k": 0.25, "h": 0.25, "p": 0.1, "c": 0.08, "u": 0.05, "uj": 0.05,
    "ul": 0.05, "uv": 0.05, "uz": 0.05, "ud": 0.05, "ug": 0.05,
    "e": 0.05, "y": 0.05, "o": 0.05, "x": 0.05, "w": 0.05,
}

# English tags follow Universal Dependencies; WORD is an open-class word the
# rules cannot split into noun, verb or adjective.
ENGLISH_ROLE_WEIGHTS: dict[str, float] = {
    "NUM": 1.0, "PROPN": 0.9, "WORD": 0.55, "ADV": 0.35,
    "AUX": 0.1, "PRON": 0.1, "DET": 0.05, "ADP": 0.08, "CCONJ": 0.05, "SCONJ": 0.1,
    "PART": 0.05, "INTJ": 0.05,
}

_CLOSED_CLASSES = {
    "DET": "a an the this that these those each every either neither some any no all both "
    "another such what which whose much many few several",
    "ADP": "of in on at by for with from to into onto upon about above below over under "
    "between among through during before after since until against within without "
    "across along around behind beyond toward towards via per than like near off out up down",
    "CCONJ": "and or but nor yet so plus",
    "SCONJ": "if because although though while whereas unless whether as once where when "
    "whenever wherever why how",
    "PRON": "i me my mine myself you your yours yourself yourselves he him his himself she "
    "her hers herself it its itself we us our ours ourselves they them their theirs "
    "themselves who whom someone something anyone anything everyone everything nobody "
    "nothing one ones",
    "AUX": "be is am are was were been being have has had having do does did doing will "
    "would shall should can could may might must ought 's 're 've 'd 'll",
    "PART": "not n't to there here",
    "INTJ": "um uh uhm er erm ah oh hmm yeah yes ok okay well hi hello wow",
    "ADV": "also very just only even still already again then now too quite rather really "
    "however thus therefore perhaps maybe often always never sometimes",
}
ENGLISH_CLOSED_CLASS: dict[str, str] = {
    word: tag for tag, words in _CLOSED_CLASSES.items() for word in words.split()
}

_HAN = r"\u3400-\u4dbf\u4e00-\u9fff"
# One pass over the text. A Han run with Latin letters glued to it goes to
# jieba whole, so that a dictionary word such as "A股" can match. Otherwise the
# match is a number or a word of letters, and other characters are skipped.
RUNS = re.compile(
    rf"(?P<han>[A-Za-z]*[{_HAN}]+(?:[A-Za-z]+[{_HAN}]+)*[A-Za-z]*)"
    r"|(?P<num>\d+(?:[.,:/]\d+)*%?)"
    r"|(?P<word>[^\W\d_]+(?:['’\-][^\W\d_]+)*)"
)
DIGITS = re.compile(r"^[\d.,:/%]+$")
LATIN = re.compile(r"^[A-Za-z]+$")
# A word starts a sentence when the text before it ends with a sentence
# terminator, optionally followed by spaces, quotes or opening brackets.
SENTENCE_END = re.compile(r"[.!?。！？:;\n][\s\"'“”(\[]*$")


def chinese_weight(tag: str) -> float:
    if tag in CHINESE_ROLE_WEIGHTS:
        return CHINESE_ROLE_WEIGHTS[tag]
    return CHINESE_ROLE_WEIGHTS.get(tag[:1], 0.5)


def english_tag(word: str, sentence_start: bool) -> str:
    closed = ENGLISH_CLOSED_CLASS.get(word.lower().replace("’", "'"))
    if closed is not None:
        return closed
    if len(word) >= 2 and word.isupper():
        return "PROPN"  # acronym: GAO, CEO
    if word[0].isupper() and not sentence_start:
        return "PROPN"
    if word.lower().endswith("ly") and len(word) > 4:
        return "ADV"
    return "WORD"


class JiebaRuleTagger:
    """The default tagger: jieba for Han runs, closed-class rules for other words.

    `segmenter` is the jieba.Tokenizer that cuts Han runs. The analyser passes
    its private one, which contains the domain terms. `extra_tags` maps words
    to tags that override jieba's dictionary, such as the tags of domain terms.
    """

    def __init__(self, segmenter: jieba.Tokenizer, extra_tags: dict[str, str] | None = None):
        self.segmenter = segmenter
        _, self.tags, _ = jieba_dictionary()
        self.extra_tags = dict(extra_tags or {})

    def chinese_tag(self, word: str) -> str:
        tag = self.extra_tags.get(word) or self.tags.get(word)
        if tag is not None:
            return tag
        if DIGITS.match(word):
            return "m"
        if LATIN.match(word):
            return "eng"
        return "un"

    def tag(self, text: str) -> list[Span]:
        spans: list[Span] = []
        for match in RUNS.finditer(text):
            start, kind = match.start(), match.lastgroup
            if kind == "han":
                pos = start
                for word in self.segmenter.cut(match.group(), HMM=True):
                    tag = self.chinese_tag(word)
                    spans.append((pos, pos + len(word), chinese_weight(tag), tag))
                    pos += len(word)
            elif kind == "num":
                spans.append((start, match.end(), ENGLISH_ROLE_WEIGHTS["NUM"], "NUM"))
            else:
                before = text[max(0, start - 4) : start]
                sentence_start = start == 0 or not before.strip() or bool(SENTENCE_END.search(before))
                tag = english_tag(match.group(), sentence_start)
                spans.append((start, match.end(), ENGLISH_ROLE_WEIGHTS[tag], tag))
        return spans
