"""Readers of structured files: JSON, JSON Lines and CSV (a segment per record or row group),
and the single records of a corpus file (lorag.knowledge.corpus)."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

from lorag.knowledge.segments import Segment, UnreadableFile, decode_text

_TEXT_KEYS = ("text", "content", "body", "abstract", "description", "page_content")
_TITLE_KEYS = ("title", "name", "heading", "subject")
_ID_KEYS = ("_id", "id", "doc_id", "uuid")


def _record_segment(record: Any, where: str) -> Segment:
    if isinstance(record, dict):
        title = next((str(record[k]) for k in _TITLE_KEYS if isinstance(record.get(k), str)), None)
        body = next((str(record[k]) for k in _TEXT_KEYS if isinstance(record.get(k), str)), None)
        ident = next((str(record[k]) for k in _ID_KEYS if k in record), None)
        if body is None:
            body = "\n".join(f"{key}: {_scalar(value)}" for key, value in record.items())
        elif title:
            body = f"{title}\n{body}"
        section = f"{where} ({ident})" if ident else where
        return Segment(body, section=section, title=title)
    return Segment(_scalar(record), section=where)


def _scalar(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def read_json(data: bytes, segment_chars: int) -> tuple[str, list[Segment]]:
    try:
        value = json.loads(decode_text(data))
    except json.JSONDecodeError as err:
        raise UnreadableFile(f"not valid JSON: {err}") from err
    title = ""
    if isinstance(value, dict):
        title = next((str(value[k]) for k in _TITLE_KEYS if isinstance(value.get(k), str)), "")
        listed = next((value[k] for k in ("documents", "records", "items", "data") if isinstance(value.get(k), list)), None)
        if listed is None:
            return title, [_record_segment(value, "record 1")]
        value = listed
    if isinstance(value, list):
        return title, [_record_segment(item, f"record {i}") for i, item in enumerate(value, start=1)]
    return title, [Segment(_scalar(value))]


def read_jsonl(data: bytes, segment_chars: int) -> tuple[str, list[Segment]]:
    segments = []
    for number, line in enumerate(decode_text(data).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise UnreadableFile(f"line {number} is not valid JSON: {err.msg}") from err
        segments.append(_record_segment(record, f"line {number}"))
    return "", segments


def read_csv(data: bytes, segment_chars: int) -> tuple[str, list[Segment]]:
    text = decode_text(data)
    try:
        dialect: Any = csv.Sniffer().sniff(text[:4096], delimiters=",;\t|")
    except csv.Error:
        dialect = csv.excel
    rows = list(csv.reader(io.StringIO(text), dialect))
    if not rows:
        return "", []
    header, body = rows[0], rows[1:]
    if not body:
        return "", [Segment(", ".join(header), section="row 1")]
    segments: list[Segment] = []
    lines: list[str] = []
    first = 2
    size = 0
    for line_no, row in enumerate(body, start=2):
        rendered = "; ".join(
            f"{header[i] if i < len(header) else f'column {i + 1}'}: {cell}" for i, cell in enumerate(row) if cell.strip()
        )
        if lines and size + len(rendered) > segment_chars:
            segments.append(Segment("\n".join(lines), section=_rows(first, line_no - 1)))
            lines, size, first = [], 0, line_no
        lines.append(rendered)
        size += len(rendered) + 1
    if lines:
        segments.append(Segment("\n".join(lines), section=_rows(first, len(body) + 1)))
    return "", segments


def read_corpus_record(data: bytes, segment_chars: int) -> tuple[str, list[Segment]]:
    """One record of a corpus file (see lorag.knowledge.corpus): title + text, one document."""
    record = json.loads(data)
    title, text = str(record.get("title") or "").strip(), str(record.get("text") or "").strip()
    body = f"{title}\n{text}" if title and text else (title or text)
    return title, [Segment(body, section=f"record {record['id']}", title=title or None)]


def _rows(first: int, last: int) -> str:
    return f"row {first}" if first == last else f"rows {first}-{last}"
