"""Read text documents from plain text files, JSON lines files and folders of them.

`read_documents` is the entry point. It reads a .txt/.md file as one document, a
.jsonl file as one document per line, and a folder recursively. Three public
long-document layouts are recognised by the shape of their records, so renamed
copies are read the same way:

- VCSum meeting transcripts: JSON lines, one transcript segment each, with `id`
  like "13_0" and `context` a list of speaker turns (each a list of sentences).
  Segments sharing the id prefix form one meeting.
- L-Eval packaged summarisation sets such as GovReport: JSON lines with the
  document in `input` and reference summaries in `outputs`.
- PDF extractions of annual reports: JSON lines, one text or table row each,
  with `page`, `allrow`, `type` and `inside`.

Every failure on user input raises densa.io.InputError naming the path (and the
line for JSON lines) and the fix.
"""

from __future__ import annotations

import ast
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from densa.io import InputError, read_text_file

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl",)
# Fields tried in this order when a JSON lines file does not name its text field.
TEXT_FIELDS = ("text", "content", "input", "context")

# Row types of the annual-report extraction for running page headers and footers
# (mostly page numbers). They are dropped because they would cut sentences that
# cross a page break.
_PAGE_FURNITURE = {"页眉", "页脚"}


@dataclass
class Document:
    """One document: its text, where it came from, and format-specific metadata."""

    text: str
    source: str
    meta: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------
# JSON lines parsing and layout detection


def _parse_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """Return (line number, object) for each non-blank line of a JSON lines file."""
    text = read_text_file(path)
    records = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(
                f"invalid JSON on line {line_no} of {path}: {err.msg} at column {err.colno}; "
                "fix that line so each line holds one JSON object"
            ) from None
        if not isinstance(record, dict):
            raise InputError(
                f"line {line_no} of {path} is a JSON {type(record).__name__}, not an object; "
                "write one JSON object per line"
            )
        records.append((line_no, record))
    if not records:
        raise InputError(f"no JSON records in {path}: every line is blank; write one JSON object per line")
    return records


def _is_vcsum(record: dict[str, Any]) -> bool:
    context = record.get("context")
    return (
        isinstance(record.get("id"), str)
        and "_" in record["id"]
        and isinstance(context, list)
        and all(isinstance(turn, list) for turn in context)
    )


def _is_leval(record: dict[str, Any]) -> bool:
    return isinstance(record.get("input"), str) and ("instructions" in record or "outputs" in record)


def _is_annual_report(record: dict[str, Any]) -> bool:
    return {"page", "inside"} <= record.keys()


def _detect_layout(record: dict[str, Any]) -> str:
    """Name the layout ("vcsum", "leval", "annual_report" or "generic") of a first record."""
    if _is_vcsum(record):
        return "vcsum"
    if _is_annual_report(record):
        return "annual_report"
    if _is_leval(record):
        return "leval"
    return "generic"


def _first_json_object(text: str) -> dict[str, Any] | None:
    """Return the first line of `text` parsed as a JSON object, or None if it is not one."""
    for line in text.splitlines():
        if line.strip():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                return None
            return record if isinstance(record, dict) else None
    return None


# ---------------------------------------------------------------------------
# Format adapters


def _require(path: Path, line_no: int, record: dict[str, Any], key: str, kind: type) -> Any:
    value = record.get(key)
    if not isinstance(value, kind):
        found = "missing" if key not in record else f"a {type(value).__name__}"
        raise InputError(
            f"line {line_no} of {path}: field {key!r} is {found}, expected a {kind.__name__}; "
            "fix the record or pass the file to the matching reader"
        )
    return value


def _segment_text(path: Path, line_no: int, context: list[Any]) -> str:
    """Join one VCSum segment: sentences of a speaker turn run on, turns go on new lines."""
    turns = []
    for turn in context:
        if not isinstance(turn, list) or not all(isinstance(s, str) for s in turn):
            raise InputError(
                f"line {line_no} of {path}: 'context' must be a list of lists of strings; "
                "fix the record"
            )
        # Sentences are kept verbatim: the Chinese transcripts need no separator
        # and already carry their own spacing around Latin words and numbers.
        turn_text = "".join(turn)
        if turn_text.strip():
            turns.append(turn_text)
    return "\n".join(turns)


def read_vcsum(path: str | os.PathLike) -> list[Document]:
    """Rebuild whole VCSum meetings from a file of transcript segments.

    Segments whose `id` shares the prefix before "_" form one meeting, joined in
    the order of their integer suffix with a blank line between segments.
    Meetings keep the order in which they first appear in the file. The dev split
    leaves gaps in some suffix sequences; `meta["segments"]` lists those present.
    """
    path = Path(path)
    meetings: dict[str, dict[int, tuple[int, dict[str, Any]]]] = {}
    for line_no, record in _parse_jsonl(path):
        segment_id = _require(path, line_no, record, "id", str)
        prefix, sep, suffix = segment_id.rpartition("_")
        if not sep or not prefix or not suffix.isdigit():
            raise InputError(
                f"line {line_no} of {path}: segment id {segment_id!r} is invalid; "
                "expected MEETING_SEGMENT such as '13_0'"
            )
        _require(path, line_no, record, "context", list)
        segments = meetings.setdefault(prefix, {})
        if int(suffix) in segments:
            raise InputError(
                f"line {line_no} of {path}: segment id {segment_id!r} appears twice "
                f"(first on line {segments[int(suffix)][0]}); remove the duplicate"
            )
        segments[int(suffix)] = (line_no, record)

    docs = []
    for meeting_id, segments in meetings.items():
        order = sorted(segments)
        parts = []
        for index in order:
            line_no, record = segments[index]
            parts.append(_segment_text(path, line_no, record["context"]))
        text = "\n\n".join(part for part in parts if part)
        if not text:
            logger.warning("VCSum meeting %s in %s has no text; skipping it", meeting_id, path)
            continue
        agendas = [segments[i][1].get("agenda") for i in order]
        docs.append(
            Document(
                text=text,
                source=str(path),
                meta={"format": "vcsum", "meeting_id": meeting_id, "segments": order, "agendas": agendas},
            )
        )
    return docs


def read_govreport(path: str | os.PathLike) -> list[Document]:
    """Read an L-Eval summarisation file such as GovReport: one report per line.

    The report is the `input` field, and `meta["summaries"]` lists the reference
    summaries from `outputs`.
    """
    path = Path(path)
    docs = []
    for line_no, record in _parse_jsonl(path):
        text = _require(path, line_no, record, "input", str)
        if not text.strip():
            logger.warning("line %d of %s has an empty 'input'; skipping it", line_no, path)
            continue
        outputs = record.get("outputs", [])
        docs.append(
            Document(
                text=text,
                source=str(path),
                meta={
                    "format": "leval",
                    "line": line_no,
                    "summaries": outputs if isinstance(outputs, list) else [outputs],
                    "dataset": record.get("source"),
                },
            )
        )
    return docs


def _row_text(row: dict[str, Any]) -> str:
    inside = row.get("inside")
    if not isinstance(inside, str):
        return ""
    if row.get("type") == "excel":
        # Table rows are stored as the Python repr of a list of cells, for example
        # "['地区', '分行', '']". literal_eval parses literals only, never code.
        try:
            cells = ast.literal_eval(inside)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            return inside.strip()
        if isinstance(cells, (list, tuple)):
            return "\t".join(str(cell) for cell in cells).strip()
    return inside.strip()


def read_annual_report(path: str | os.PathLike) -> list[Document]:
    """Read a PDF-extracted annual report (one JSON object per text or table row).

    Returns a single document. Rows are ordered by (`page`, `allrow`) and joined
    with newlines, and pages are separated by a blank line. Table cells are joined
    with tabs. Running page headers and footers are dropped. `meta["page_starts"]` maps each
    page number to the character offset where its text starts.
    """
    path = Path(path)
    rows = []
    for line_no, record in _parse_jsonl(path):
        page = _require(path, line_no, record, "page", int)
        order = record.get("allrow", line_no)
        if not isinstance(order, int):
            order = line_no
        rows.append((page, order, record))
    rows.sort(key=lambda row: (row[0], row[1]))

    pages: dict[int, list[str]] = {}
    for page, _, record in rows:
        if record.get("type") in _PAGE_FURNITURE:
            continue
        line = _row_text(record)
        if line:
            pages.setdefault(page, []).append(line)
    if not pages:
        raise InputError(f"no text rows in {path}; every 'inside' field is empty")

    parts, page_starts, offset = [], {}, 0
    for page, lines in pages.items():
        page_text = "\n".join(lines)
        page_starts[page] = offset
        parts.append(page_text)
        offset += len(page_text) + 2  # the "\n\n" page separator
    text = "\n\n".join(parts)
    meta = {"format": "annual_report", "pages": len(pages), "page_starts": page_starts}
    return [Document(text=text, source=str(path), meta=meta)]


def _read_generic_jsonl(path: Path, text_field: str | None) -> list[Document]:
    records = _parse_jsonl(path)
    if text_field is None:
        first = records[0][1]
        text_field = next((name for name in TEXT_FIELDS if isinstance(first.get(name), str)), None)
        if text_field is None:
            raise InputError(
                f"cannot find the text field on line {records[0][0]} of {path}: none of "
                f"{list(TEXT_FIELDS)} holds a string (keys: {sorted(first)}); "
                "pass text_field= with the key that holds the text"
            )
    docs = []
    for line_no, record in records:
        text = _require(path, line_no, record, text_field, str)
        if not text.strip():
            logger.warning("line %d of %s has an empty %r; skipping it", line_no, path, text_field)
            continue
        meta = {key: value for key, value in record.items() if key != text_field}
        meta["line"] = line_no
        docs.append(Document(text=text, source=str(path), meta=meta))
    return docs


_LAYOUT_READERS: dict[str, Callable[[str | os.PathLike], list[Document]]] = {
    "vcsum": read_vcsum,
    "leval": read_govreport,
    "annual_report": read_annual_report,
}


# ---------------------------------------------------------------------------
# Entry point


def _read_file(path: Path, text_field: str | None) -> list[Document]:
    suffix = path.suffix.lower()
    if suffix not in TEXT_SUFFIXES + JSONL_SUFFIXES:
        raise InputError(
            f"unsupported file type {suffix or '(none)'!r}: {path}; "
            f"pass a {', '.join(TEXT_SUFFIXES + JSONL_SUFFIXES)} file or a folder of them"
        )
    text = read_text_file(path)

    # An explicit text_field selects plain JSON lines reading. Otherwise the first
    # record decides the layout; VCSum segments also come as .txt files.
    if suffix in JSONL_SUFFIXES and text_field is not None:
        return _read_generic_jsonl(path, text_field)
    first = _first_json_object(text)
    layout = _detect_layout(first) if first is not None else "generic"
    if layout in _LAYOUT_READERS and (suffix in JSONL_SUFFIXES or layout == "vcsum"):
        logger.debug("reading %s as %s", path, layout)
        return _LAYOUT_READERS[layout](path)
    if suffix in JSONL_SUFFIXES:
        return _read_generic_jsonl(path, text_field)
    return [Document(text=text, source=str(path), meta={"format": "text"})]


def _is_hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def read_documents(path: str | os.PathLike, text_field: str | None = None) -> list[Document]:
    """Read every document in a file or folder.

    A .txt or .md file is one document. A .jsonl file contains one document per
    line, with the text in `text_field` or, when that is None, in the first of
    "text", "content", "input", "context" whose value is a string. VCSum, L-Eval and
    annual-report files are recognised by their records and read with
    `read_vcsum`, `read_govreport` or `read_annual_report` (unless `text_field`
    is given for a .jsonl file).

    A folder is read recursively in sorted path order. Hidden entries and files
    of other types are skipped, and so are empty files (with a warning), but any
    other bad file raises.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"path not found: {path}; pass an existing file or folder")
    if path.is_file():
        docs = _read_file(path, text_field)
        if not docs:
            raise InputError(f"no documents in {path}; every record is empty")
        return docs
    if not path.is_dir():
        raise InputError(f"not a file or folder: {path}; pass a text file, a .jsonl file or a folder")

    suffixes = TEXT_SUFFIXES + JSONL_SUFFIXES
    files = sorted(
        (p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in suffixes and not _is_hidden(p, path)),
        key=lambda p: p.relative_to(path).as_posix(),
    )
    docs: list[Document] = []
    for file in files:
        size = file.stat().st_size
        if size == 0 or (size < 4096 and not file.read_bytes().strip()):
            logger.warning("skipping empty file %s", file)
            continue
        docs.extend(_read_file(file, text_field))
    if not docs:
        raise InputError(
            f"no readable documents in folder {path}; add non-empty {', '.join(suffixes)} files"
        )
    logger.info("read %d documents from %d files under %s", len(docs), len(files), path)
    return docs
