"""File readers: bytes -> titled segments that remember where they came from (page, section).

Each reader keeps the structure a citation needs (PDF pages, Markdown/HTML/DOCX
headings, JSON records, CSV rows); the splitter later cuts segments into chunks
and every chunk inherits its segment's location. Readers raise UnreadableFile with
a reason a person can act on; ingestion reports it by name and goes on.
"""

from __future__ import annotations

import io
import re
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

from lorag.knowledge.llama_metadata import page_of, section_of
from lorag.knowledge.record_readers import read_corpus_record, read_csv, read_json, read_jsonl
from lorag.knowledge.segments import (
    EmptyDocument,
    ReadResult,
    Segment,
    UnreadableFile,
    UnsupportedFile,
    decode_text,
    location_of,
)

__all__ = ["EmptyDocument", "ReadResult", "UnreadableFile", "UnsupportedFile", "decode_text", "location_of", "read_bytes"]

@dataclass(frozen=True)
class BytesReader:
    """A reader of a file's bytes into titled segments: what lorag's own readers are.

    Registered like a plugin's llama-index reader (register_knowledge_readers), but it reads
    the bytes directly, keeps page and section for citations and needs no temporary file.
    """

    file_type: str
    read: Callable[[bytes, int], tuple[str, list[Segment]]]


def registered_readers() -> dict[str, Any]:
    """Extension -> reader, from the process's plugins (the built-in `file_readers` among them)."""
    from lorag.plugins.manager import knowledge_readers

    return knowledge_readers()


def file_type_of(name: str) -> str | None:
    """The type of reader for the file's extension (e.g. "markdown"; a plugin's: the extension)."""
    suffix = Path(name).suffix.lower()
    reader = registered_readers().get(suffix)
    return None if reader is None else _type_read_by(reader, suffix)


def _type_read_by(reader: Any, suffix: str) -> str:
    """A built-in reader's type ("markdown"); a plugin's reader is named by its extension."""
    return reader.file_type if isinstance(reader, BytesReader) else suffix


# Types that are never files on disk, only documents ingestion makes itself (a corpus record).
RECORD_SUFFIX = ".lorag-record"


def read_bytes(name: str, data: bytes, segment_chars: int = 2000) -> ReadResult:
    """Read a file's content; `name` picks the reader and gives the fallback title."""
    suffix = Path(name).suffix.lower()
    readers = registered_readers()
    reader = _RECORD_READER if suffix == RECORD_SUFFIX else readers.get(suffix)
    if reader is None:
        raise UnsupportedFile(
            f"unsupported file type {Path(name).suffix or '(no extension)'!r} (supported: {', '.join(sorted(readers))})"
        )
    file_type = _type_read_by(reader, suffix)
    if not data.strip():
        raise EmptyDocument("empty file")
    read = reader.read if isinstance(reader, BytesReader) else partial(_read_with_plugin, reader, name)
    try:
        title, segments = read(data, segment_chars)
    except UnreadableFile:
        raise
    except Exception as err:  # a corrupt PDF/DOCX: any parser error means unreadable
        raise UnreadableFile(f"cannot read {file_type}: {type(err).__name__}: {err}") from err
    segments = [s for s in segments if s.text.strip()]
    if not segments:
        raise EmptyDocument(f"no text found in this {file_type} file")
    return ReadResult(file_type=file_type, title=(title or Path(name).stem).strip(), segments=segments)


def _read_with_plugin(reader: Any, name: str, data: bytes, segment_chars: int) -> tuple[str, list[Segment]]:
    """A llama-index BaseReader (class or factory) from a plugin: one segment per Document it returns."""
    instance = reader() if isinstance(reader, type) or not hasattr(reader, "load_data") else reader
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(name).name
        path.write_bytes(data)
        documents = instance.load_data(path)
    # Citation fields as llama-index readers name them too (page_label, header_path): see llama_metadata.
    segments = [
        Segment(text=document.text, page=page_of(document.metadata or {}), section=section_of(document.metadata or {}))
        for document in documents
    ]
    title = next((str(d.metadata["title"]) for d in documents if (d.metadata or {}).get("title")), "")
    return title, segments


# ---------------------------------------------------------------------------- text


def _read_text(data: bytes, segment_chars: int) -> tuple[str, list[Segment]]:
    return "", [Segment(decode_text(data))]


class _Headings:
    """The heading path above the current line, e.g. 'Install > Linux'."""

    def __init__(self) -> None:
        self.path: list[tuple[int, str]] = []

    def enter(self, level: int, heading: str) -> None:
        while self.path and self.path[-1][0] >= level:
            self.path.pop()
        self.path.append((level, heading))

    @property
    def section(self) -> str | None:
        return " > ".join(heading for _, heading in self.path) or None


_HEADING_RE = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")


def _read_markdown(data: bytes, segment_chars: int) -> tuple[str, list[Segment]]:
    text = decode_text(data)
    title = ""
    stack = _Headings()
    segments: list[Segment] = []
    lines: list[str] = []
    in_fence = False

    def flush() -> None:
        # A heading with no text under it yet stays with the text that follows.
        if any(line.strip() and not _HEADING_RE.match(line) for line in lines):
            segments.append(Segment("\n".join(lines), section=stack.section))
            lines.clear()

    for line in text.splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            in_fence = not in_fence
        match = None if in_fence else _HEADING_RE.match(line)
        if match:
            flush()
            level, heading = len(match.group(1)), match.group(2).strip()
            if level == 1 and not title:
                title = heading
            stack.enter(level, heading)
        lines.append(line)
    if lines:
        segments.append(Segment("\n".join(lines), section=stack.section))
    return title, segments


_MARK = "\u0000H"


def _read_html(data: bytes, segment_chars: int) -> tuple[str, list[Segment]]:
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(decode_text(data), "html.parser")
    for tag in soup(["script", "style", "noscript", "template", "svg"]):
        tag.decompose()
    title = soup.title.get_text(" ", strip=True) if soup.title else ""
    if soup.title:
        soup.title.decompose()
    for heading in soup.find_all(["h1", "h2", "h3", "h4", "h5", "h6"]):
        level = int(heading.name[1])
        heading.replace_with(f"\n{_MARK}{level}\u0000{heading.get_text(' ', strip=True)}\n")
    text = soup.get_text("\n")
    stack = _Headings()
    segments: list[Segment] = []
    buffer: list[str] = []

    def flush() -> None:
        body = "\n".join(line for line in buffer if line)
        if body.strip():
            segments.append(Segment(body, section=stack.section))
        buffer.clear()

    for raw in text.splitlines():
        line = " ".join(raw.split())
        if raw.startswith(_MARK):
            flush()
            level_str, _, heading_text = raw[len(_MARK) :].partition("\u0000")
            level = int(level_str)
            if level == 1 and not title:
                title = heading_text
            stack.enter(level, heading_text)
            buffer.append(heading_text)
        else:
            buffer.append(line)
    flush()
    return title, segments


# ---------------------------------------------------------------------------- pdf / docx


def _read_pdf(data: bytes, segment_chars: int) -> tuple[str, list[Segment]]:
    from pypdf import PdfReader

    reader = PdfReader(io.BytesIO(data))
    if reader.is_encrypted:
        try:
            reader.decrypt("")
        except Exception as err:
            raise UnreadableFile("encrypted PDF") from err
    title = ""
    if reader.metadata is not None and reader.metadata.title:
        title = str(reader.metadata.title)
    segments = [
        Segment(page.extract_text() or "", page=number)
        for number, page in enumerate(reader.pages, start=1)
    ]
    return title, segments


_W = "{http://schemas.openxmlformats.org/wordprocessingml/2006/main}"


def _read_docx(data: bytes, segment_chars: int) -> tuple[str, list[Segment]]:
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        document = archive.read("word/document.xml")
    except (zipfile.BadZipFile, KeyError) as err:
        raise UnreadableFile("not a valid .docx file (no word/document.xml)") from err
    title = ""
    try:
        core = ElementTree.fromstring(archive.read("docProps/core.xml"))
        node = core.find("{http://purl.org/dc/elements/1.1/}title")
        title = (node.text or "") if node is not None else ""
    except (KeyError, ElementTree.ParseError):
        pass
    root = ElementTree.fromstring(document)
    stack = _Headings()
    segments: list[Segment] = []
    buffer: list[str] = []
    has_body = False
    for paragraph in root.iter(f"{_W}p"):
        parts = []
        for node in paragraph.iter():
            if node.tag == f"{_W}t" and node.text:
                parts.append(node.text)
            elif node.tag == f"{_W}tab":
                parts.append("\t")
            elif node.tag in (f"{_W}br", f"{_W}cr"):
                parts.append("\n")
        text = "".join(parts).strip()
        if not text:
            continue
        style_node = paragraph.find(f"{_W}pPr/{_W}pStyle")
        style = (style_node.get(f"{_W}val") or "") if style_node is not None else ""
        level = _docx_heading_level(style)
        if style.lower() == "title":
            title = title or text
        elif level:
            # A heading with no text under it yet stays with the text that follows.
            if has_body:
                segments.append(Segment("\n".join(buffer), section=stack.section))
                buffer, has_body = [], False
            stack.enter(level, text)
        else:
            has_body = True
        buffer.append(text)
    if buffer:
        segments.append(Segment("\n".join(buffer), section=stack.section))
    return title, segments


def _docx_heading_level(style: str) -> int:
    lowered = style.lower().replace(" ", "")
    match = re.fullmatch(r"heading(\d)", lowered)
    return int(match.group(1)) if match else 0


_TEXT = BytesReader("text", _read_text)
_MARKDOWN = BytesReader("markdown", _read_markdown)
_HTML = BytesReader("html", _read_html)
_JSONL = BytesReader("jsonl", read_jsonl)
_RECORD_READER = BytesReader("corpus", read_corpus_record)

# What the built-in `file_readers` plugin registers (lorag.plugins.builtin.file_readers).
BUILTIN_READERS: dict[str, BytesReader] = {
    ".txt": _TEXT,
    ".text": _TEXT,
    ".rst": _TEXT,
    ".md": _MARKDOWN,
    ".markdown": _MARKDOWN,
    ".html": _HTML,
    ".htm": _HTML,
    ".pdf": BytesReader("pdf", _read_pdf),
    ".docx": BytesReader("docx", _read_docx),
    ".json": BytesReader("json", read_json),
    ".jsonl": _JSONL,
    ".ndjson": _JSONL,
    ".csv": BytesReader("csv", read_csv),
}
