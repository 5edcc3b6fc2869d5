"""Corpus files (BEIR's corpus.jsonl): one document per record, so judged sets can name documents.

A record `{"_id": "4983", "title": ..., "text": ...}` of `/data/corpus.jsonl` becomes the
document `/data/corpus.jsonl#4983` (its *reference*, what qrels name, is `4983`), with
title + text as its content. Each record is versioned by the hash of what is indexed
(id, title, text), so re-ingesting an unchanged corpus writes nothing and a changed
record replaces only its own chunks. A malformed corpus is refused whole, naming the
line, before anything is written.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from lorag.knowledge.errors import IngestInputError
from lorag.knowledge.json_lines import json_objects
from lorag.knowledge.readers import RECORD_SUFFIX, decode_text
from lorag.knowledge.source_files import Collected, Skipped, SourceFile

CORPUS_FILE_TYPE = "corpus"
CORPUS_NAMES = ("corpus.jsonl",)  # BEIR's name: always read as a corpus
SEPARATOR = "#"


def is_corpus(path: Path, forced: bool) -> bool:
    """BEIR's corpus.jsonl always; any .jsonl / .ndjson when the user says --corpus."""
    return path.name.lower() in CORPUS_NAMES or (forced and path.suffix.lower() in (".jsonl", ".ndjson"))


def record_source(corpus: str, record_id: str) -> str:
    return f"{corpus}{SEPARATOR}{record_id}"


def document_ref(metadata: dict[str, Any]) -> str:
    """What a judged set calls a chunk's document: the record id of a corpus record, else its source."""
    source = str(metadata.get("source", ""))
    if metadata.get("file_type") == CORPUS_FILE_TYPE and SEPARATOR in source:
        return source.rsplit(SEPARATOR, 1)[1]
    return source


def read_records(path: Path, id_field: str = "_id") -> tuple[list[SourceFile], list[Skipped]]:
    """Every record of a corpus file as a document; empty records are reported, not indexed."""
    corpus = os.path.abspath(path)
    label = path.name
    try:
        text = decode_text(path.read_bytes())
    except OSError as err:
        raise IngestInputError(f"{label}: cannot read: {err.strerror or err}", param="paths") from None
    except Exception as err:  # binary junk
        raise IngestInputError(f"{label}: {err}", param="paths") from None
    files: list[SourceFile] = []
    skipped: list[Skipped] = []
    seen: dict[str, int] = {}
    for number, where, record in json_objects(text, label, IngestInputError, "paths"):
        raw_id = record.get(id_field)
        if raw_id is None or isinstance(raw_id, (dict, list)) or not str(raw_id).strip():
            raise IngestInputError(f"{where}: no {id_field!r} field (name the id field with --id-field)", param="paths")
        record_id = str(raw_id).strip()
        if record_id in seen:
            raise IngestInputError(
                f"{where}: duplicate id {record_id!r} (first on line {seen[record_id]})", param="paths"
            )
        seen[record_id] = number
        title = _text(record.get("title"), where, "title")
        body = _text(record.get("text"), where, "text")
        source = record_source(corpus, record_id)
        if not title.strip() and not body.strip():
            skipped.append(Skipped(source, f"{where}: empty record (no title or text)", "empty_record"))
            continue
        data = json.dumps({"id": record_id, "title": title, "text": body}, ensure_ascii=False, sort_keys=True)
        files.append(SourceFile(source=source, name=record_id + RECORD_SUFFIX, data=data.encode()))
    if not seen:
        raise IngestInputError(f"{label}: no records (an empty corpus)", param="paths")
    return files, skipped


def _text(value: Any, where: str, key: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise IngestInputError(f"{where}: {key!r} must be a string", param="paths")
    return value


def expand_corpora(collected: Collected, *, forced: bool = False, id_field: str = "_id") -> Collected:
    """Replace each corpus file among the collected files by its records (and widen --sync's
    scope so records gone from a corpus are removed)."""
    files: list[SourceFile] = []
    skipped = list(collected.skipped)
    corpora: list[str] = []
    for file in collected.files:
        if file.path is not None and is_corpus(file.path, forced):
            records, empty = read_records(file.path, id_field)
            files.extend(records)
            skipped.extend(empty)
            corpora.append(file.source + SEPARATOR)
        else:
            files.append(file)
    if not corpora:
        return collected
    return Collected(files=files, skipped=skipped, scope=_widened(collected.scope, corpora))


def _widened(scope: Callable[[str], bool], prefixes: Iterable[str]) -> Callable[[str], bool]:
    starts = tuple(prefixes)
    return lambda source: scope(source) or source.startswith(starts)
