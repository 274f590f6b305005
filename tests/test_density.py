"""Density analyser on real Chinese and English documents, and the plans built from it."""

from __future__ import annotations

import ast
import json
import math
import re
from collections import defaultdict
from pathlib import Path

import jieba
import numpy as np
import pytest
import torch

from densa.density import (
    DensityAnalyzer,
    DensityConfig,
    JiebaRuleTagger,
    PlanConfig,
    SyntaxTagger,
    plan_blocks,
)
from densa.density.lexicon import chinese_reference, english_reference, load_domain_terms
from densa.io import InputError

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
THUOCL = DATA / "finance_dict" / "thuocl_caijing" / "THUOCL_caijing.txt"
CACL2 = DATA / "finance_dict" / "cacl2_bank" / "480000_bank_general.txt"

pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"real data folder {DATA} is missing")


# ---------------------------------------------------------------- real texts


def vcsum_meeting(meeting_id: str) -> str:
    """One whole VCSum meeting: its segments in order, one utterance per line."""
    segments = []
    with open(DATA / "longdoc" / "vcsum" / "short_dev.txt", encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            prefix, index = record["id"].split("_")
            if prefix == meeting_id:
                segments.append((int(index), record["context"]))
    segments.sort()
    return "\n".join("".join(utterances) for _, context in segments for utterances in context)


def govreport(index: int) -> str:
    with open(DATA / "longdoc" / "govreport" / "gov_report_summ.jsonl", encoding="utf-8") as f:
        return json.loads(f.readlines()[index])["input"]


def annual_report_pages(first: int, last: int) -> str:
    """Text lines and table rows (cells joined by tabs) of the annual report's pages."""
    rows = []
    with open(DATA / "longdoc" / "annual_reports" / "601658_2019_annual_report.jsonl", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if not first <= row["page"] <= last or not row["inside"]:
                continue
            if row["type"] == "text":
                rows.append(row["inside"])
            elif row["type"] == "excel":
                # Table rows are stored as the repr of a list of cell strings.
                rows.append("\t".join(ast.literal_eval(row["inside"])))
    return "\n".join(rows)


@pytest.fixture(scope="module")
def analyzer() -> DensityAnalyzer:
    return DensityAnalyzer()


@pytest.fixture(scope="module")
def finance_analyzer() -> DensityAnalyzer:
    return DensityAnalyzer(DensityConfig(domain_dicts=(str(THUOCL),)))


@pytest.fixture(scope="module")
def chinese_text() -> str:
    return annual_report_pages(10, 12)


@pytest.fixture(scope="module")
def english_text() -> str:
    return govreport(0)[:20000]


def jieba_offsets(text: str) -> list[tuple[int, int]]:
    """Token offsets from jieba's own cut: multi-character tokens like a BPE vocabulary's."""
    offsets, pos = [], 0
    for word in jieba.lcut(text, HMM=False):
        offsets.append((pos, pos + len(word)))
        pos += len(word)
    return offsets


def regex_offsets(text: str) -> list[tuple[int, int]]:
    """GPT-style pre-tokens: a word or number with its leading space, or one other character."""
    return [m.span() for m in re.finditer(r" ?[^\W\d_]+| ?\d{1,3}|\s+|[^\w\s]", text)]


def token_texts(text: str, offsets) -> list[str]:
    return [text[s:e] for s, e in offsets]


# ---------------------------------------------------------------- shapes and ranges


@pytest.mark.parametrize("which", ["chinese_text", "english_text"])
def test_density_shape_and_range(analyzer, which, request):
    text = request.getfixturevalue(which)
    result = analyzer.analyze(text)
    for name in ("density", "frequency", "syntax"):
        values = getattr(result, name)
        assert values.shape == (len(text),), name
        assert values.dtype == torch.float32, name
        assert float(values.min()) >= 0.0, name
        assert float(values.max()) <= 1.0, name
    assert result.words
    assert all(0.0 <= w[4] <= 1.0 for w in result.words)


def test_empty_text(analyzer):
    result = analyzer.analyze("")
    assert result.density.shape == (0,)
    assert result.words == []
    assert analyzer.analyze("", []).density.shape == (0,)


# ---------------------------------------------------------------- ranking


def mean_density_of(result, texts, predicate) -> float:
    values = [float(d) for t, d in zip(texts, result.density) if predicate(t)]
    assert values, "no token matched; the sample text should contain some"
    return sum(values) / len(values)


def test_chinese_particles_rank_lowest(finance_analyzer, chinese_text):
    offsets = jieba_offsets(chinese_text)
    result = finance_analyzer.analyze(chinese_text, offsets)
    texts = token_texts(chinese_text, offsets)
    terms = set(finance_analyzer.domain_terms)

    particles = mean_density_of(result, texts, lambda t: t in {"的", "了", "和", "及", "在"})
    numbers = mean_density_of(result, texts, lambda t: re.fullmatch(r"\d[\d,.]{2,}", t) is not None)
    finance_terms = mean_density_of(result, texts, lambda t: t in terms)
    assert particles < 0.2
    assert numbers > particles + 0.5
    assert finance_terms > particles + 0.5


def test_english_function_words_rank_lowest(analyzer, english_text):
    offsets = regex_offsets(english_text)
    result = analyzer.analyze(english_text, offsets)
    texts = [t.strip() for t in token_texts(english_text, offsets)]

    function_words = mean_density_of(result, texts, lambda t: t.lower() in {"the", "of", "and", "to", "a"})
    numbers = mean_density_of(result, texts, lambda t: t.isdigit())
    acronyms = mean_density_of(result, texts, lambda t: len(t) >= 2 and t.isupper() and t.isalpha())
    assert function_words < 0.2
    assert numbers > function_words + 0.5
    assert acronyms > function_words + 0.4


# ---------------------------------------------------------------- the two signals


def test_signals_exposed_and_different(analyzer, chinese_text):
    result = analyzer.analyze(chinese_text)
    assert not torch.equal(result.frequency, result.syntax)

    # For word characters the density is exactly the documented 0.5 / 0.5 mix.
    word = result.frequency > 0
    assert word.any()
    expected = 0.5 * result.frequency[word] + 0.5 * result.syntax[word]
    torch.testing.assert_close(result.density[word], expected, atol=1e-6, rtol=0)

    # Characters outside every word get the punctuation weight.
    punctuation = torch.tensor([ch in "，。：（）、\n" for ch in chinese_text])
    assert punctuation.any()
    assert torch.all(result.density[punctuation] == torch.tensor(0.05))
    assert torch.all(result.frequency[punctuation] == 0)


def dictionary_surprisal(word: str) -> float:
    """-ln p(word) read straight from jieba's dict.txt with add-0.5 smoothing."""
    path = Path(jieba.__file__).parent / "dict.txt"
    counts = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            parts = line.split()
            counts[parts[0]] = int(parts[1])
    total = sum(counts.values())
    return -math.log((counts.get(word, 0) + 0.5) / (total + 0.5 * len(counts)))


def test_frequency_signal_by_hand(analyzer):
    # 银行 occurs once, so no burstiness bonus: freq = sigmoid((s - center) / temperature).
    text = "银行"
    result = analyzer.analyze(text)
    s = dictionary_surprisal("银行")
    cfg = analyzer.config
    expected = 1.0 / (1.0 + math.exp(-(s - cfg.center) / cfg.temperature))
    assert float(result.frequency[0]) == pytest.approx(expected, abs=1e-6)
    assert result.words[0][3] == "n"
    assert float(result.syntax[0]) == pytest.approx(0.75)


def test_burstiness_raises_repeated_topic_word(analyzer):
    once = "我们讨论了拨备覆盖率。" + "今天天气很好，大家都来了。" * 3
    repeated = "我们讨论了拨备覆盖率。" + "拨备覆盖率很好，拨备覆盖率也来了。" * 3
    first = analyzer.analyze(once)
    second = analyzer.analyze(repeated)
    start = once.index("拨备")
    assert float(second.frequency[start]) > float(first.frequency[start])


def test_english_rule_tags(analyzer):
    text = "The GAO said Congress approved $1.2 billion for the program in 2019 because it was late."
    tags = {w[2]: w[3] for w in analyzer.analyze(text).words}
    assert tags["The"] == "DET"
    assert tags["GAO"] == "PROPN"
    assert tags["Congress"] == "PROPN"
    assert tags["because"] == "SCONJ"
    assert tags["it"] == "PRON"
    assert tags["was"] == "AUX"
    assert tags["for"] == "ADP"
    assert tags["1.2"] == "NUM"
    assert tags["2019"] == "NUM"
    assert tags["program"] == "WORD"


def test_chinese_tags_from_jieba(analyzer):
    text = "殷总是上海鑫湾信息科技的CEO，2019年营收增长了12%。"
    words = analyzer.analyze(text).words
    tags = {w[2]: w[3] for w in words}
    assert tags["的"] == "uj"
    assert tags["了"] == "ul"
    assert tags["上海"] == "ns"
    assert tags["CEO"] == "eng"
    assert tags["2019"] == "NUM"
    # Every word span covers exactly its text.
    assert all(text[s:e] == w for s, e, w, _, _ in words)


# ---------------------------------------------------------------- domain dictionaries


def test_domain_dictionary_raises_term(analyzer, finance_analyzer, chinese_text):
    term = "手续费"
    assert term in finance_analyzer.domain_terms
    start = chinese_text.index(term)
    without = float(analyzer.analyze(chinese_text).density[start])
    with_dict = float(finance_analyzer.analyze(chinese_text).density[start])
    assert without < 0.7
    assert with_dict >= finance_analyzer.config.domain_floor - 1e-6  # float32 result
    assert with_dict > without


def test_domain_term_segmented_privately():
    jieba.dt.initialize()
    before = dict(jieba.dt.FREQ)
    analyzer = DensityAnalyzer(DensityConfig(domain_dicts=(str(CACL2),)))
    text = "本行的贷款承诺余额下降。"
    words = [w[2] for w in analyzer.analyze(text).words]
    assert "贷款承诺" in words
    assert "贷款承诺" in analyzer.domain_terms
    assert jieba.dt.FREQ == before
    assert "贷款承诺" not in [w[2] for w in DensityAnalyzer().analyze(text).words]


def test_domain_filter_drops_names_and_titles():
    kept, dropped = load_domain_terms(CACL2)
    terms = {t.term for t in kept}
    assert "贷款承诺" in terms
    assert "量化选股" in terms
    assert "中国银行平顶山分行" not in terms  # branch name
    assert "资本之王——花旗集团的缔造者桑迪·威尔" not in terms  # book title
    assert "80后必修的30堂理财课" not in terms
    assert "技术面 (股票)" not in terms
    assert dropped > 0

    thuocl = {t.term for t in load_domain_terms(THUOCL)[0]}
    assert "发展" not in thuocl  # too common in jieba's dictionary
    assert "出台" not in thuocl  # a verb
    assert "市值" in thuocl


# ---------------------------------------------------------------- token mapping


def test_token_density_is_char_max(analyzer, chinese_text, english_text):
    for text, offsets in (
        (chinese_text, jieba_offsets(chinese_text)),
        (english_text, regex_offsets(english_text)),
    ):
        chars = analyzer.analyze(text)
        tokens = analyzer.analyze(text, offsets)
        assert tokens.density.shape == (len(offsets),)
        assert any(e - s > 1 for s, e in offsets)
        for i, (s, e) in enumerate(offsets):
            assert float(tokens.density[i]) == float(chars.density[s:e].max()), (i, text[s:e])


def test_token_mapping_by_hand(analyzer):
    text = "银行的利润"
    words = {w[2]: w[4] for w in analyzer.analyze(text).words}
    assert set(words) == {"银行", "的", "利润"}
    # Tokens: "银", "行的", "利润", an empty special token, and "的利" straddling two words.
    offsets = [(0, 1), (1, 3), (3, 5), (0, 0), (2, 4)]
    density = analyzer.analyze(text, offsets).density.tolist()
    assert density[0] == pytest.approx(words["银行"])
    assert density[1] == pytest.approx(max(words["银行"], words["的"]))
    assert density[2] == pytest.approx(words["利润"])
    assert density[3] == pytest.approx(analyzer.config.punctuation_weight)
    assert density[4] == pytest.approx(max(words["的"], words["利润"]))


def test_whitespace_and_punctuation_tokens(analyzer):
    text = "Revenue rose 12%, the bank said."
    offsets = [(0, 7), (7, 8), (8, 12), (12, 13), (13, 16), (16, 17), (17, 18)]
    result = analyzer.analyze(text, offsets)
    assert float(result.density[1]) == pytest.approx(0.05)  # " "
    assert float(result.density[5]) == pytest.approx(0.05)  # ","
    assert float(result.density[4]) > 0.7  # "12%"


# ---------------------------------------------------------------- block plans


def check_plan(density: torch.Tensor, config: PlanConfig) -> None:
    plan = plan_blocks(density, config)
    bs = config.block_size
    fractions = [
        float((density[block * bs : (block + 1) * bs] >= config.threshold).float().mean())
        for block in range(plan.n_blocks)
    ]
    assert int(plan.dense.sum()) <= math.ceil(config.max_dense_fraction * plan.n_blocks)
    lowest_dense = min((f for f, d in zip(fractions, plan.dense) if d), default=1.0)
    for block, fraction in enumerate(fractions):
        if plan.dense[block]:
            assert fraction >= config.min_dense_fraction, block
        else:
            # A skipped block is either below the share or outranked by every dense block.
            assert fraction < config.min_dense_fraction or fraction <= lowest_dense, block
            window = int(plan.window[block])
            in_near = config.near_window[0] <= window <= config.near_window[1]
            in_far = config.far_window[0] <= window <= config.far_window[1]
            assert in_near or in_far, (block, window)


def test_plan_from_finance_report(finance_analyzer):
    text = annual_report_pages(8, 30)[:16384]
    density = finance_analyzer.analyze(text).density
    plan = plan_blocks(density)
    assert plan.dense.any(), "number-heavy finance pages should have dense blocks"
    assert not plan.dense.all()
    check_plan(density, PlanConfig())
    check_plan(density, PlanConfig(threshold=0.6, block_size=64, min_dense_fraction=0.4, max_dense_fraction=0.1))


def test_plan_from_meeting_is_sparse(analyzer):
    # A conversational document: few dense tokens, so most blocks keep narrow windows.
    text = vcsum_meeting("96")[:16384]
    density = analyzer.analyze(text).density
    above = float((density >= 0.7).float().mean())
    assert 0.01 < above < 0.15
    plan = plan_blocks(density)
    assert plan.block_sparsity() > 0.9
    check_plan(density, PlanConfig())


# ---------------------------------------------------------------- plug-in taggers


class SpaceTagger:
    """Splits on spaces and gives every word the same weight: a stand-in for a parser."""

    def tag(self, text):
        return [(m.start(), m.end(), 0.4, "TOK") for m in re.finditer(r"\S+", text)]


class OverlappingTagger:
    def tag(self, text):
        return [(0, 3, 0.5, "A"), (1, 4, 0.5, "B")]


class HeavyTagger:
    def tag(self, text):
        return [(0, len(text), 2.0, "A")]


def test_custom_tagger_plugs_in():
    assert isinstance(SpaceTagger(), SyntaxTagger)
    result = DensityAnalyzer(tagger=SpaceTagger()).analyze("alpha beta gamma")
    assert [w[3] for w in result.words] == ["TOK", "TOK", "TOK"]
    assert float(result.syntax[0]) == pytest.approx(0.4)
    assert float(result.syntax[5]) == pytest.approx(0.05)  # the space


def test_default_tagger_is_jieba_rule_tagger(analyzer):
    assert isinstance(analyzer.tagger, JiebaRuleTagger)


def test_bad_tagger_output_rejected():
    with pytest.raises(ValueError, match="overlapping"):
        DensityAnalyzer(tagger=OverlappingTagger()).analyze("abcdef")
    with pytest.raises(ValueError, match="outside"):
        DensityAnalyzer(tagger=HeavyTagger()).analyze("abcdef")


# ---------------------------------------------------------------- bad input


def test_non_string_text_rejected(analyzer):
    with pytest.raises(InputError, match="text must be a str, got bytes"):
        analyzer.analyze("银行".encode())


@pytest.mark.parametrize(
    "offsets, message",
    [
        ([(0, 2), (2, 9)], r"offsets\[1\] = \(2, 9\) is out of range"),
        ([(0, 2), (-1, 1)], r"offsets\[1\] = \(-1, 1\)"),
        ([(3, 1)], r"offsets\[0\] = \(3, 1\)"),
        ([(0, 1, 2)], "shape"),
        ([("a", "b")], "integer pairs"),
    ],
)
def test_bad_offsets_rejected(analyzer, offsets, message):
    with pytest.raises(InputError, match=message):
        analyzer.analyze("银行利润", offsets)


def test_missing_dictionary_rejected(tmp_path):
    missing = tmp_path / "no_such_dict.txt"
    with pytest.raises(InputError, match="no_such_dict.txt"):
        DensityConfig(domain_dicts=(str(missing),))


def test_empty_dictionary_rejected(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(InputError, match="empty"):
        DensityAnalyzer(DensityConfig(domain_dicts=(str(empty),)))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"frequency_weight": 0.7}, "must sum to 1"),
        ({"frequency_weight": 1.5, "syntax_weight": -0.5}, "frequency_weight=1.5"),
        ({"temperature": 0.0}, "temperature=0.0"),
        ({"center": -1.0}, "center=-1.0"),
        ({"burst_weight": -1.0}, "burst_weight=-1.0"),
        ({"punctuation_weight": 1.2}, "punctuation_weight=1.2"),
        ({"domain_floor": 2.0}, "domain_floor=2.0"),
        ({"domain_dicts": "dict.txt"}, "tuple of paths"),
    ],
)
def test_invalid_config_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DensityConfig(**kwargs)


def test_reference_tables_are_real():
    zh, en = chinese_reference(), english_reference()
    assert zh.total > 10_000_000
    assert en.total > 50_000
    assert zh.surprisal("的") < zh.surprisal("银行") < zh.surprisal("拨备覆盖率")
    assert en.surprisal("the") < en.surprisal("function") < en.surprisal("biofuel")
    assert np.isclose(en.unknown_surprisal, en.surprisal("biofuel"))
