"""Ingestion of documents that are already read (llama-index Documents and nodes, an imported
llama-index collection): the normal Writer, fed segments instead of files.

The manifest protocol, grouping, reporting and keyword-index invalidation are ingestion's own
(lorag.knowledge.ingest); only reading is replaced, and, for an import, embedding: its chunks keep
the vectors they were stored with (one chunk per segment, see `Whole`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np

from lorag.knowledge.chunking import Chunker, PreparedDoc
from lorag.knowledge.ingest import IngestReport, Writer
from lorag.knowledge.manifest import DocRecord
from lorag.knowledge.segments import ReadResult
from lorag.knowledge.source_files import SourceFile

if TYPE_CHECKING:
    from lorag.knowledge.ingest import _Group
    from lorag.knowledge.service import KnowledgeService

ORIGIN = "llama-index"  # the origin and file type of what comes from llama-index


@dataclass
class Incoming:
    """One document read elsewhere: `file.data` is what versions it (its hash), `read` its segments.

    `vectors` and `chunk_metadata` (one per segment) only go with Whole chunking."""

    file: SourceFile
    read: ReadResult
    vectors: np.ndarray | None = None
    chunk_metadata: list[dict[str, Any]] = field(default_factory=list)


class Whole(Chunker):
    """One chunk per segment, as it is: nodes that were embedded whole stay whole."""

    def __init__(self, *_: Any) -> None:  # no splitter to build
        pass

    def split(self, text: str) -> list[str]:
        return [text] if text.strip() else []


class _ReadWriter(Writer):
    """A Writer whose documents come from `incoming` (by source) instead of being read."""

    def __init__(self, *args: Any, incoming: Sequence[Incoming], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.incoming = {doc.file.source: doc for doc in incoming}
        self.stored: dict[str, np.ndarray] = {}  # chunk id -> its stored vector

    def _read(self, file: SourceFile, data: bytes) -> ReadResult:
        return self.incoming[file.source].read

    def _prepare(self, file: SourceFile, records: dict[str, DocRecord], report: IngestReport) -> PreparedDoc | str:
        prepared = super()._prepare(file, records, report)
        if isinstance(prepared, str):
            return prepared
        doc = self.incoming[file.source]
        for chunk, extra in zip(prepared.chunks, doc.chunk_metadata, strict=False):
            chunk.metadata.update(extra)
        if doc.vectors is not None:
            self.stored.update({chunk.id: doc.vectors[i] for i, chunk in enumerate(prepared.chunks)})
        return prepared

    def _embed(self, group: _Group) -> None:
        pending = group.chunks[group.embedded:]
        if not pending or not all(chunk.id in self.stored for chunk in pending):
            super()._embed(group)
            return
        group.vectors.append(np.stack([self.stored[chunk.id] for chunk in pending]).astype(np.float32))
        group.embedded = len(group.chunks)


def write_incoming(service: KnowledgeService, name: str, docs: Sequence[Incoming], *, whole: bool = False) -> IngestReport:
    """Write read documents into a base the way KnowledgeService.ingest_files writes files (it does).
    `whole`: a chunk per segment (needed when the documents bring their vectors)."""
    return service.ingest_files(name, [doc.file for doc in docs], writer=partial(_ReadWriter, incoming=docs),
                                chunker=Whole if whole else Chunker)
