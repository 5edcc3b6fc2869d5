"""What readers produce: titled segments that remember where they came from, and why a file fails.

Shared by the built-in readers (lorag.knowledge.readers, lorag.knowledge.record_readers),
plugin readers and ingestion.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass


class UnreadableFile(Exception):
    """The file cannot be turned into text; the message says why."""


class UnsupportedFile(UnreadableFile):
    """No reader for this file type."""


class EmptyDocument(UnreadableFile):
    """The file has no text to index."""


@dataclass
class Segment:
    text: str
    page: int | None = None
    section: str | None = None
    title: str | None = None  # a record's own title (JSON/JSONL), else the document's


@dataclass
class ReadResult:
    file_type: str
    title: str
    segments: list[Segment]


def decode_text(data: bytes) -> str:
    """UTF-8 (or a legacy 8-bit encoding); binary junk is refused rather than indexed."""
    if b"\x00" in data[:65536]:
        raise UnreadableFile("binary data (NUL bytes), not a text file")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        pass
    text = data.decode("cp1252", errors="replace")
    sample = text[:65536]
    bad = sum(1 for ch in sample if ch == "\ufffd" or (unicodedata.category(ch) == "Cc" and ch not in "\t\n\r\f"))
    if bad > max(8, len(sample) // 100):
        raise UnreadableFile("binary data (not valid UTF-8 text)")
    return text


def location_of(page: int | None, section: str | None) -> str:
    """The human-readable place of a chunk in its document, e.g. 'page 3' or 'Setup > Install'."""
    parts: Iterable[str] = ([f"page {page}"] if page else []) + ([section] if section else [])
    return ", ".join(parts)
