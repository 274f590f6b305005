"""Tests for densa.data: readers on the shared long documents, corpus, tokenizer, packing."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from densa.data import (
    DensaTokenizer,
    Document,
    PackedDataset,
    builtin_corpus,
    longdoc_path,
    pack_documents,
    read_annual_report,
    read_documents,
    read_govreport,
    read_vcsum,
    train_val_split,
)
from densa.io import InputError

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
LONGDOC = DATA / "longdoc"
VCSUM = LONGDOC / "vcsum" / "short_dev.txt"
GOVREPORT = LONGDOC / "govreport" / "gov_report_summ.jsonl"
ANNUAL_REPORT = LONGDOC / "annual_reports" / "601658_2019_annual_report.jsonl"

needs_data = pytest.mark.skipif(not LONGDOC.is_dir(), reason="../shared/data/longdoc is not next to the repo")


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ---------------------------------------------------------------------------
# Readers on the shared data


@needs_data
def test_vcsum_meetings_rebuilt():
    segments = _jsonl(VCSUM)
    by_meeting: dict[str, list[tuple[int, list[list[str]]]]] = {}
    for record in segments:
        prefix, suffix = record["id"].split("_")
        by_meeting.setdefault(prefix, []).append((int(suffix), record["context"]))

    docs = read_vcsum(VCSUM)

    assert len(docs) == len(by_meeting) == 22
    assert [doc.meta["meeting_id"] for doc in docs] == list(by_meeting)
    for doc in docs:
        parts = sorted(by_meeting[doc.meta["meeting_id"]])
        first_utterance = parts[0][1][0][0]
        last_utterance = parts[-1][1][-1][-1]
        assert doc.meta["segments"] == [index for index, _ in parts]
        assert doc.text.startswith(first_utterance)
        assert doc.text.endswith(last_utterance)

        # Each segment's first sentence appears after the previous segment's.
        position = 0
        for _, context in parts:
            position = doc.text.index(context[0][0], position)

        # Nothing is lost or reordered: only newline separators were added.
        utterances = "".join(s for _, context in parts for turn in context for s in turn)
        assert doc.text.replace("\n", "") == utterances.replace("\n", "")


@needs_data
def test_vcsum_out_of_order_segments(tmp_path):
    lines = VCSUM.read_text(encoding="utf-8").splitlines()
    meeting_13 = [line for line in lines if json.loads(line)["id"].startswith("13_")]
    shuffled = tmp_path / "segments.txt"
    shuffled.write_text("\n".join(reversed(meeting_13)) + "\n", encoding="utf-8")

    (doc,) = read_documents(shuffled)

    first = json.loads(meeting_13[0])["context"][0][0]
    assert doc.meta["segments"] == [0, 1]
    assert doc.text.startswith(first)


@needs_data
def test_govreport_reports():
    records = _jsonl(GOVREPORT)

    docs = read_govreport(GOVREPORT)

    assert len(docs) == 9
    assert [doc.text for doc in docs] == [record["input"] for record in records]
    assert min(len(doc.text.split()) for doc in docs) > 2000
    assert all(doc.meta["summaries"] and doc.meta["summaries"][0] for doc in docs)


@needs_data
def test_annual_report_pages_in_order():
    rows = _jsonl(ANNUAL_REPORT)
    first_row_of_page: dict[int, dict] = {}
    for row in rows:
        if row["type"] not in ("页眉", "页脚") and row["inside"].strip():
            first_row_of_page.setdefault(row["page"], row)

    (doc,) = read_annual_report(ANNUAL_REPORT)

    assert len(doc.text) > 200_000
    assert doc.text.startswith("中国邮政储蓄银行股份有限公司")
    page_starts = doc.meta["page_starts"]
    assert list(page_starts) == sorted(first_row_of_page)
    assert list(page_starts.values()) == sorted(page_starts.values())
    checked = 0
    for page, row in first_row_of_page.items():
        if row["type"] == "text":
            assert doc.text.startswith(row["inside"].strip(), page_starts[page]), f"page {page}"
            checked += 1
    assert checked > 300


@needs_data
def test_annual_report_drops_page_numbers():
    (doc,) = read_annual_report(ANNUAL_REPORT)

    # Footer rows hold bare page numbers ("1", "2", ...); none may stay on a line of its own.
    lines = set(doc.text.splitlines())
    assert not {"1", "2", "3", "100"} & lines
    assert "\t" in doc.text  # table rows become tab-separated cells


@needs_data
def test_layouts_detected_by_content(tmp_path):
    vcsum_lines = VCSUM.read_text(encoding="utf-8").splitlines()[:2]
    (tmp_path / "meeting.txt").write_text("\n".join(vcsum_lines), encoding="utf-8")
    (tmp_path / "meeting_lines.jsonl").write_text("\n".join(vcsum_lines), encoding="utf-8")
    shutil.copy(GOVREPORT, tmp_path / "reports.jsonl")
    shutil.copy(ANNUAL_REPORT, tmp_path / "pages.jsonl")

    meeting = read_documents(tmp_path / "meeting.txt")
    assert [doc.meta["format"] for doc in meeting] == ["vcsum"]
    assert [doc.text for doc in read_documents(tmp_path / "meeting_lines.jsonl")] == [meeting[0].text]
    assert [doc.meta["format"] for doc in read_documents(tmp_path / "reports.jsonl")] == ["leval"] * 9
    (annual,) = read_documents(tmp_path / "pages.jsonl")
    assert annual.text == read_annual_report(ANNUAL_REPORT)[0].text


@needs_data
def test_longdoc_folder_read():
    docs = read_documents(LONGDOC)

    formats = [doc.meta["format"] for doc in docs]
    # Sorted paths: annual_reports/, govreport/, vcsum/long_dev.txt, vcsum/short_dev.txt.
    assert formats[0] == "annual_report"
    assert formats[1:10] == ["leval"] * 9
    assert formats.count("vcsum") == 22
    assert longdoc_path() == LONGDOC


# ---------------------------------------------------------------------------
# Readers on generic files


def test_jsonl_text_field_autodetected(tmp_path):
    for field in ("text", "content", "input"):
        path = tmp_path / f"{field}.jsonl"
        path.write_text(
            json.dumps({"id": 1, field: "first doc"}) + "\n\n" + json.dumps({"id": 2, field: "第二篇"}) + "\n",
            encoding="utf-8",
        )

        docs = read_documents(path)

        assert [doc.text for doc in docs] == ["first doc", "第二篇"]
        assert [doc.meta["line"] for doc in docs] == [1, 3]
        assert docs[0].meta["id"] == 1


def test_jsonl_explicit_text_field(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"text": "short", "body": "the body"}) + "\n", encoding="utf-8")

    (doc,) = read_documents(path, text_field="body")

    assert doc.text == "the body"
    assert doc.meta["text"] == "short"


def test_jsonl_missing_text_field(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"body": "x"}) + "\n", encoding="utf-8")

    with pytest.raises(InputError, match="text_field") as err:
        read_documents(path)
    assert str(path) in str(err.value)

    path.write_text(json.dumps({"text": "x"}) + "\n" + json.dumps({"txt": "y"}) + "\n", encoding="utf-8")
    with pytest.raises(InputError, match="line 2"):
        read_documents(path)


def test_folder_recursive_sorted(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.txt").write_text("zeta", encoding="utf-8")
    (tmp_path / "a.txt").write_text("alpha", encoding="utf-8")
    (tmp_path / "c.jsonl").write_text('{"text": "gamma"}\n{"text": "delta"}\n', encoding="utf-8")
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    (tmp_path / "image.png").write_bytes(b"\x89PNG\x00\x00")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "h.txt").write_text("hidden", encoding="utf-8")

    docs = read_documents(tmp_path)

    assert [doc.text for doc in docs] == ["alpha", "zeta", "gamma", "delta"]
    assert docs[1].source == str(tmp_path / "b" / "z.txt")
    assert [doc.text for doc in read_documents(tmp_path)] == [doc.text for doc in docs]


def test_folder_without_documents(tmp_path):
    (tmp_path / "notes.csv").write_text("a,b\n", encoding="utf-8")
    (tmp_path / "empty.txt").write_text("  \n", encoding="utf-8")

    with pytest.raises(InputError, match="no readable documents") as err:
        read_documents(tmp_path)
    assert str(tmp_path) in str(err.value)


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.txt", b"", "empty"),
        ("empty.jsonl", b"\n\n", "empty"),
        ("binary.txt", b"abc\x00\x01\x02", "binary"),
        ("latin1.txt", "café".encode("latin-1"), "UTF-8"),
        ("bad.jsonl", b'{"text": "ok"}\n{"text": "broken\n', "line 2"),
        ("list.jsonl", b'["not", "an", "object"]\n', "line 1"),
        ("table.csv", b"a,b\n1,2\n", "unsupported file type"),
    ],
)
def test_bad_file_raises(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)

    with pytest.raises(InputError, match=message) as err:
        read_documents(path)
    assert str(path) in str(err.value)


def test_missing_path_raises(tmp_path):
    path = tmp_path / "nope.txt"

    with pytest.raises(InputError, match="not found") as err:
        read_documents(path)
    assert str(path) in str(err.value)


# ---------------------------------------------------------------------------
# Built-in corpus and splits


def test_builtin_corpus_deterministic():
    from pydoc_data.topics import topics

    docs = builtin_corpus()

    assert len(docs) > 50
    assert [doc.meta["topic"] for doc in docs] == sorted(topics)
    assert all(doc.text.strip() for doc in docs)
    assert sum(len(doc.text) for doc in docs) > 100_000
    assert [doc.text for doc in builtin_corpus()] == [doc.text for doc in docs]


def test_train_val_split_partitions():
    docs = builtin_corpus()

    train, val = train_val_split(docs, val_fraction=0.1, seed=3)

    assert len(val) == round(len(docs) * 0.1)
    assert len(train) + len(val) == len(docs)
    assert {d.source for d in train}.isdisjoint({d.source for d in val})
    assert [d.source for d in train] == [d.source for d in docs if d in train]
    again_train, again_val = train_val_split(docs, val_fraction=0.1, seed=3)
    assert [d.source for d in again_val] == [d.source for d in val]
    _, other_val = train_val_split(docs, val_fraction=0.1, seed=4)
    assert [d.source for d in other_val] != [d.source for d in val]


def test_train_val_split_edge_cases():
    docs = [Document(text=str(i), source=str(i)) for i in range(3)]

    assert train_val_split(docs, val_fraction=0.0, seed=0) == (docs, [])
    assert len(train_val_split(docs, val_fraction=0.01, seed=0)[1]) == 1
    assert len(train_val_split(docs, val_fraction=0.99, seed=0)[0]) == 1
    with pytest.raises(ValueError, match="val_fraction"):
        train_val_split(docs, val_fraction=1.0, seed=0)
    with pytest.raises(ValueError, match="at least 2"):
        train_val_split(docs[:1], val_fraction=0.5, seed=0)


# ---------------------------------------------------------------------------
# Tokenizer

MIXED_TEXTS = [
    "The assert statement checks an expression.\n\tIndented line; x = [1, 2, 3]  # comment",
    "本行不良贷款率为0.86%，较上年末下降0.00个百分点。资本充足率保持稳健。",
    "Mixed 混合 text: CEO 殷易昊 said 区块链 is 🙂 okay — naïve café, 龘, e\u0301.",
    "literal <|endoftext|> and <|pad|> stay text",
    "",
    " leading and trailing spaces ",
]


@pytest.fixture(scope="module")
def tokenizer() -> DensaTokenizer:
    texts = [doc.text for doc in builtin_corpus()]
    if VCSUM.is_file():
        texts += [doc.text for doc in read_vcsum(VCSUM)[:3]]
    return DensaTokenizer.train(texts, vocab_size=2048, domain_terms=["不良贷款率", "NPL", "资本充足率"])


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-to-character table, which HF's ByteLevel pre-tokenizer uses."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def test_tokenizer_round_trip(tokenizer):
    for text in MIXED_TEXTS:
        ids, offsets = tokenizer.encode(text)

        assert tokenizer.decode(ids) == text
        assert len(ids) == len(offsets)
        assert all(0 <= i < tokenizer.vocab_size for i in ids)


def test_tokenizer_special_tokens_not_injected(tokenizer):
    ids, _ = tokenizer.encode(MIXED_TEXTS[3])

    assert tokenizer.eos_id not in ids
    assert tokenizer.pad_id not in ids
    assert tokenizer.decode([tokenizer.eos_id]) == "<|endoftext|>"
    assert tokenizer.decode([tokenizer.eos_id], skip_special_tokens=True) == ""


def test_tokenizer_offsets_enclose_token_bytes(tokenizer):
    byte_of_char = {c: b for b, c in _bytes_to_unicode().items()}
    vocab = {i: token for token, i in tokenizer._tokenizer.get_vocab().items()}
    for text in MIXED_TEXTS:
        ids, offsets = tokenizer.encode(text)
        char_of_byte = [i for i, ch in enumerate(text) for _ in ch.encode("utf-8")]

        position = 0
        for token_id, (start, end) in zip(ids, offsets):
            token = vocab[token_id]
            if tokenizer.decode([token_id]) == token and not token.isascii():
                n_bytes = len(token.encode("utf-8"))  # an added domain term, stored verbatim
            else:
                n_bytes = len(bytes(byte_of_char[c] for c in token))
            expected = (char_of_byte[position], char_of_byte[position + n_bytes - 1] + 1)
            assert (start, end) == expected, (text, token)
            position += n_bytes
        assert position == len(text.encode("utf-8"))


def test_tokenizer_offsets_cover_text(tokenizer):
    for text in MIXED_TEXTS[:4]:
        ids, offsets = tokenizer.encode(text)
        starts = [start for start, _ in offsets]
        ends = [end for _, end in offsets]

        assert starts == sorted(starts)
        assert ends == sorted(ends)
        assert (starts[0], ends[-1]) == (0, len(text))
        # No gaps: a token starts at or before the previous token's end. Tokens
        # holding parts of one multi-byte character share or overlap its span.
        assert all(start <= end for start, end in zip(starts[1:], ends))
        assert all(end > start for start, end in offsets)

    # A character absent from training stays as its 3 UTF-8 byte tokens.
    assert tokenizer.encode("龘")[1] == [(0, 1)] * 3


def test_domain_terms_single_tokens(tokenizer):
    for term in ("不良贷款率", "资本充足率", "NPL"):
        assert len(tokenizer.encode(term)[0]) == 1

    ids, offsets = tokenizer.encode("本行不良贷款率为0.86%")
    term_id = tokenizer.token_to_id("不良贷款率")
    assert ids.count(term_id) == 1
    assert offsets[ids.index(term_id)] == (2, 7)

    ids, _ = tokenizer.encode("the NPL ratio")
    assert tokenizer.token_to_id("NPL") in ids
    ids, _ = tokenizer.encode("UNPLANNED")
    assert tokenizer.token_to_id("NPL") not in ids


def test_tokenizer_vocab_size_bound():
    texts = [doc.text for doc in builtin_corpus()[:20]]

    tok = DensaTokenizer.train(texts, vocab_size=600, domain_terms=["不良贷款率", "the", "不良贷款率"])

    assert tok.vocab_size <= 600
    assert tok.vocab_size == max(tok._tokenizer.get_vocab(with_added_tokens=True).values()) + 1
    # "the" already is one BPE token, so only the Chinese term was added.
    assert len(tok.encode("the")[0]) == 1
    assert len(tok.encode("不良贷款率")[0]) == 1
    assert tok.encode("the other")[0][:1] == tok.encode("the")[0]
    with pytest.raises(ValueError, match="vocab_size"):
        DensaTokenizer.train(texts, vocab_size=259, domain_terms=["不良贷款率", "资本"])
    with pytest.raises(InputError, match="no training text"):
        DensaTokenizer.train(["", ""], vocab_size=600)


def test_tokenizer_save_load(tokenizer, tmp_path):
    path = tmp_path / "tok" / "tokenizer.json"

    tokenizer.save(path)
    loaded = DensaTokenizer.load(path)

    assert [p.name for p in path.parent.iterdir()] == ["tokenizer.json"]
    assert loaded.to_json() == tokenizer.to_json()
    assert (loaded.vocab_size, loaded.eos_id, loaded.pad_id) == (
        tokenizer.vocab_size,
        tokenizer.eos_id,
        tokenizer.pad_id,
    )
    for text in MIXED_TEXTS:
        assert loaded.encode(text) == tokenizer.encode(text)
    # The special-token guard is not stored in the file and must be restored.
    assert loaded.eos_id not in loaded.encode(MIXED_TEXTS[3])[0]


def test_tokenizer_load_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        DensaTokenizer.load(tmp_path / "missing.json")

    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text('{"version": "1.0", "model": ', encoding="utf-8")
    with pytest.raises(InputError, match="invalid tokenizer file") as err:
        DensaTokenizer.load(corrupt)
    assert str(corrupt) in str(err.value)

    other = tmp_path / "other.json"
    other.write_text(json.dumps({"hello": "world"}), encoding="utf-8")
    with pytest.raises(InputError, match="invalid tokenizer file"):
        DensaTokenizer.load(other)


# ---------------------------------------------------------------------------
# Packing


class CountingDensity:
    """Deterministic density from character offsets, counting how often it runs."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, text: str, offsets: list[tuple[int, int]]) -> torch.Tensor:
        self.calls += 1
        return torch.tensor([(start % 10) / 10 for start, _ in offsets], dtype=torch.float32)


@pytest.fixture(scope="module")
def small_docs() -> list[Document]:
    return [
        Document(text="The assert statement checks a condition at run time.", source="a"),
        Document(text="本行不良贷款率为0.86%，资本充足率保持稳健。", source="b"),
        Document(text="", source="empty"),
        Document(text="A short third document with some more English words in it.", source="c"),
    ]


def _reference_stream(docs, tokenizer):
    ids, density, eos_positions = [], [], []
    for doc in docs:
        doc_ids, offsets = tokenizer.encode(doc.text)
        if not doc_ids:
            continue
        ids += doc_ids + [tokenizer.eos_id]
        density += [(start % 10) / 10 for start, _ in offsets] + [0.0]
        eos_positions.append(len(ids) - 1)
    return ids, density, eos_positions


def test_pack_shapes_and_contents(tokenizer, small_docs):
    seq_len = 8
    ids, density, eos_positions = _reference_stream(small_docs, tokenizer)

    dataset = pack_documents(small_docs, tokenizer, seq_len, density_fn=CountingDensity())

    n_seq = (len(ids) - 1) // seq_len
    assert isinstance(dataset, PackedDataset)
    assert dataset.tokens.shape == (n_seq, seq_len + 1)
    assert dataset.tokens.dtype == torch.int64
    assert dataset.density.shape == (n_seq, seq_len + 1)
    assert dataset.density.dtype == torch.float32
    for i in range(n_seq):
        window = slice(i * seq_len, i * seq_len + seq_len + 1)
        assert dataset.tokens[i].tolist() == ids[window]
        assert dataset.density[i].tolist() == pytest.approx(density[window])

    # EOS ends each non-empty document and appears nowhere else.
    stream = torch.cat([dataset.tokens[0], dataset.tokens[1:, 1:].reshape(-1)]).tolist()
    assert [i for i, t in enumerate(stream) if t == tokenizer.eos_id] == [
        p for p in eos_positions if p < len(stream)
    ]
    assert len(eos_positions) == 3


def test_pack_items_shift_targets(tokenizer, small_docs):
    dataset = pack_documents(small_docs, tokenizer, 8, density_fn=CountingDensity())

    item = dataset[1]

    assert len(dataset) == dataset.tokens.size(0)
    assert dataset.seq_len == 8
    assert torch.equal(item["inputs"], dataset.tokens[1, :-1])
    assert torch.equal(item["targets"], dataset.tokens[1, 1:])
    assert torch.equal(item["density"], dataset.density[1, :-1])
    assert torch.equal(dataset[0]["targets"][-1], dataset[1]["inputs"][0])


def test_pack_cache_hit(tokenizer, small_docs, tmp_path):
    density_fn = CountingDensity()

    first = pack_documents(small_docs, tokenizer, 8, cache_dir=tmp_path, density_fn=density_fn)
    calls_after_first = density_fn.calls
    second = pack_documents(small_docs, tokenizer, 8, cache_dir=tmp_path, density_fn=density_fn)

    assert calls_after_first == 3  # once per non-empty document
    assert density_fn.calls == calls_after_first
    assert torch.equal(first.tokens, second.tokens)
    assert torch.equal(first.density, second.density)
    assert [p.suffix for p in tmp_path.iterdir()] == [".safetensors"]

    pack_documents(small_docs, tokenizer, 4, cache_dir=tmp_path, density_fn=density_fn)
    assert density_fn.calls == 2 * calls_after_first
    changed = small_docs[:1] + [Document(text="本行不良贷款率上升。", source="b")] + small_docs[2:]
    pack_documents(changed, tokenizer, 8, cache_dir=tmp_path, density_fn=density_fn)
    assert density_fn.calls == 3 * calls_after_first
    assert len(list(tmp_path.iterdir())) == 3


def test_pack_corrupt_cache_rebuilt(tokenizer, small_docs, tmp_path, caplog):
    density_fn = CountingDensity()
    first = pack_documents(small_docs, tokenizer, 8, cache_dir=tmp_path, density_fn=density_fn)
    (cache_file,) = tmp_path.iterdir()
    cache_file.write_bytes(b"not a safetensors file")

    with caplog.at_level(logging.WARNING, logger="densa.data.packing"):
        again = pack_documents(small_docs, tokenizer, 8, cache_dir=tmp_path, density_fn=density_fn)

    assert "unreadable packing cache" in caplog.text
    assert density_fn.calls == 6
    assert torch.equal(first.tokens, again.tokens)


def test_pack_bad_inputs(tokenizer, small_docs):
    with pytest.raises(InputError, match="smaller seq_len"):
        pack_documents(small_docs[:1], tokenizer, 4096, density_fn=CountingDensity())
    with pytest.raises(InputError, match="no documents"):
        pack_documents([], tokenizer, 8, density_fn=CountingDensity())
    with pytest.raises(ValueError, match="seq_len"):
        pack_documents(small_docs, tokenizer, 0, density_fn=CountingDensity())
    with pytest.raises(ValueError, match="one value per token"):
        pack_documents(small_docs, tokenizer, 8, density_fn=lambda text, offsets: torch.zeros(1))
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        pack_documents(small_docs, tokenizer, 8, density_fn=lambda text, offsets: torch.full((len(offsets),), 2.0))


def test_pack_with_density_analyzer(tokenizer, small_docs, tmp_path):
    analyzer_module = pytest.importorskip(
        "densa.density.analyzer", reason="densa.density.analyzer is not in this checkout yet"
    )
    analyzer = analyzer_module.DensityAnalyzer()
    ids, offsets = tokenizer.encode(small_docs[0].text)
    expected = analyzer.analyze(small_docs[0].text, offsets).density

    dataset = pack_documents(small_docs, tokenizer, 8, cache_dir=tmp_path)
    cached = pack_documents(small_docs, tokenizer, 8, cache_dir=tmp_path)

    stream_density = torch.cat([dataset.density[0], dataset.density[1:, 1:].reshape(-1)])
    assert torch.allclose(stream_density[: len(ids)], expected.float())
    assert stream_density[len(ids)] == 0.0  # the EOS after the first document
    assert bool(((dataset.density >= 0) & (dataset.density <= 1)).all())
    assert torch.equal(cached.density, dataset.density)
    assert len(list(tmp_path.iterdir())) == 1

    other_config = analyzer_module.DensityConfig(center=0.8)
    pack_documents(small_docs, tokenizer, 8, cache_dir=tmp_path, analyzer_config=other_config)
    assert len(list(tmp_path.iterdir())) == 2
