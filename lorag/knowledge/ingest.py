"""Ingestion: files -> segments -> chunks (llama-index splitters) -> embeddings -> Chroma.

Incremental and idempotent: a document is keyed by its source and versioned by the
sha256 of its bytes, so an unchanged file costs one hash and adds nothing, a changed
file replaces its chunks, and `--sync` removes documents whose files disappeared.
Documents are written in groups through the manifest protocol (see manifest.py),
which keeps every document whole across Ctrl-C and kill -9.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from lorag.knowledge.chunking import Chunk, Chunker, PreparedDoc, prepare
from lorag.knowledge.critical import interrupts_deferred
from lorag.knowledge.embeddings import Embedder
from lorag.knowledge.manifest import (
    COMMITTED,
    REMOVING,
    WRITE_BATCH,
    WRITING,
    DocRecord,
    Manifest,
    batched,
    chunk_id_for,
    doc_id_for,
    settle,
)
from lorag.knowledge.readers import (
    EmptyDocument,
    UnreadableFile,
    UnsupportedFile,
    read_bytes,
)
from lorag.knowledge.segments import ReadResult
from lorag.knowledge.settings import IngestSettings
from lorag.knowledge.source_files import Skipped, SourceFile
from lorag.logging import get_logger

log = get_logger("lorag.knowledge.ingest")

_LOOKAHEAD = 64  # documents read and split ahead of the one being written (about a group)


# ---------------------------------------------------------------------------- writing


@dataclass
class IngestReport:
    kb: str
    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    recovered: int = 0
    chunks_written: int = 0
    chunks_deleted: int = 0
    seconds: float = 0.0

    @property
    def failed(self) -> list[Skipped]:
        """Skips that lost a document someone meant to index (not just an unsupported type)."""
        return [s for s in self.skipped if s.kind not in ("unsupported", "empty_record")]

    def to_dict(self) -> dict[str, Any]:
        return {
            "kb": self.kb,
            "added": self.added,
            "updated": self.updated,
            "unchanged": self.unchanged,
            "removed": self.removed,
            "skipped": [s.to_dict() for s in self.skipped],
            "recovered": self.recovered,
            "chunks_written": self.chunks_written,
            "chunks_deleted": self.chunks_deleted,
            "seconds": round(self.seconds, 3),
        }


@dataclass
class _Group:
    """Documents written (committed) together, and the vectors of their chunks so far."""

    docs: list[PreparedDoc] = field(default_factory=list)
    chunks: list[Chunk] = field(default_factory=list)
    vectors: list[np.ndarray] = field(default_factory=list)
    embedded: int = 0  # the first `embedded` chunks have their vectors
    started: float = field(default_factory=time.perf_counter)

    def add(self, doc: PreparedDoc) -> None:
        self.docs.append(doc)
        self.chunks.extend(doc.chunks)

    @property
    def size(self) -> int:
        return len(self.chunks)

    @property
    def unembedded(self) -> int:
        return len(self.chunks) - self.embedded


ProgressFn = Callable[[str, str], None]  # (event, source): "unchanged"|"skipped"|"written"|...


class Writer:
    """Writes documents of one knowledge base following the manifest protocol."""

    def __init__(
        self,
        kb: str,
        chunks_collection: Any,
        manifest: Manifest,
        settings: IngestSettings,
        embedder: Embedder | None = None,
        chunker: Chunker | None = None,
    ) -> None:
        """`embedder` and `chunker` are needed to ingest, not to remove."""
        self.kb = kb
        self.chunks = chunks_collection
        self.manifest = manifest
        self.embedder = embedder
        self.chunker = chunker
        self.settings = settings
        self._started = time.perf_counter()

    def ingest(
        self,
        files: list[SourceFile],
        report: IngestReport,
        *,
        sync_scope: Callable[[str], bool] | None = None,
        progress: ProgressFn | None = None,
    ) -> IngestReport:
        def note(event: str, source: str) -> None:
            if progress is not None:
                progress(event, source)

        records = self.manifest.all()
        seen: set[str] = set()
        group = _Group()
        log.info("kb.ingest.start", kb=self.kb, files=len(files), documents=len(records))
        assert self.embedder is not None
        for file, prepared, next_ready in self._prepared_ahead(files, records, report):
            seen.add(file.source)
            if isinstance(prepared, str):
                note(prepared, file.source)
                continue
            group.add(prepared)
            # A group embeds in one call (sorted by length, least padding), except while the next
            # document is still being read and split: that wait is spent embedding what is here.
            if not next_ready and group.unembedded >= self.embedder.settings.batch_size:
                self._embed(group)
            if group.size >= self.settings.group_chunks:
                self._write_group(group, records, report, note)
                group = _Group()
        if group.docs:
            self._write_group(group, records, report, note)
        if sync_scope is not None:
            gone = [
                r for r in records.values()
                if r.origin == "path" and r.source not in seen and sync_scope(r.source)
            ]
            if gone:
                self.remove(gone, report)
                for record in gone:
                    note("removed", record.source)
        report.seconds = time.perf_counter() - self._started
        log.info(
            "kb.ingest.done",
            kb=self.kb,
            added=len(report.added),
            updated=len(report.updated),
            unchanged=len(report.unchanged),
            removed=len(report.removed),
            skipped=len(report.skipped),
            chunks=report.chunks_written,
            seconds=round(report.seconds, 3),
        )
        return report

    def _prepared_ahead(
        self, files: list[SourceFile], records: dict[str, DocRecord], report: IngestReport
    ) -> Iterator[tuple[SourceFile, PreparedDoc | str, bool]]:
        """Read and split the next documents in a thread while this one embeds the current
        group (torch releases the GIL); a bounded look-ahead keeps memory flat. Each document
        comes with whether the next one is ready (True at the end)."""
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kb-prepare")
        pending: deque[tuple[SourceFile, Future[PreparedDoc | str]]] = deque()
        queue = iter(files)
        try:
            while True:
                while len(pending) < _LOOKAHEAD:
                    file = next(queue, None)
                    if file is None:
                        break
                    pending.append((file, pool.submit(self._prepare, file, records, report)))
                if not pending:
                    return
                file, future = pending.popleft()
                yield file, future.result(), not pending or pending[0][1].done()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _prepare(self, file: SourceFile, records: dict[str, DocRecord], report: IngestReport) -> PreparedDoc | str:
        """The document's chunks, or why there are none: "unchanged" or "skipped"."""

        def skip(reason: str, kind: str) -> str:
            report.skipped.append(Skipped(file.source, reason, kind))
            log.warning("kb.ingest.skip", kb=self.kb, source=file.source, reason=reason)
            return "skipped"

        try:
            size = file.size()
            if size > self.settings.max_file_bytes:
                return skip(
                    f"too large: {size / 1e6:.1f} MB, the limit is {self.settings.max_file_bytes / 1e6:.1f} MB "
                    "(knowledge.ingest.max_file_bytes)",
                    "too_large",
                )
            data = file.read()
        except OSError as err:
            return skip(f"cannot read: {err.strerror or err}", "unreadable")
        content_hash = hashlib.sha256(data).hexdigest()
        existing = records.get(doc_id_for(file.source))
        if existing is not None and existing.state == COMMITTED and existing.content_hash == content_hash:
            report.unchanged.append(file.source)
            return "unchanged"
        try:
            read = self._read(file, data)
        except UnsupportedFile as err:
            return skip(str(err), "unsupported")
        except EmptyDocument as err:
            return skip(str(err), "empty")
        except UnreadableFile as err:
            return skip(str(err), "unreadable")
        assert self.chunker is not None
        prepared = prepare(file, data, content_hash, read, self.chunker)
        if not prepared.chunks:
            return skip("no text to index", "empty")
        return prepared

    def _read(self, file: SourceFile, data: bytes) -> ReadResult:
        """The file's titled segments (a writer of documents read elsewhere has them already)."""
        return read_bytes(file.name, data)

    def _embed(self, group: _Group) -> None:
        """Embed the group's chunks that have no vector yet."""
        assert self.embedder is not None
        texts = [c.text for c in group.chunks[group.embedded:]]
        if texts:
            group.vectors.append(self.embedder.encode_documents(texts))
            group.embedded = len(group.chunks)

    def _write_group(
        self,
        group: _Group,
        records: dict[str, DocRecord],
        report: IngestReport,
        note: Callable[[str, str], None],
    ) -> None:
        # Embedding is the slow part and writes nothing: it runs before the critical section,
        # where a Ctrl-C simply stops ingestion with the knowledge base untouched.
        self._embed(group)
        docs, chunks, vectors = group.docs, group.chunks, np.concatenate(group.vectors)
        old = {doc.record.doc_id: records.get(doc.record.doc_id) for doc in docs}
        with interrupts_deferred():  # the report too: a held Ctrl-C must not hide a committed group
            with self._settled_on_error(docs):
                stale = self._commit_group(docs, old, chunks, vectors)
            for doc in docs:
                records[doc.record.doc_id] = replace(doc.record, state=COMMITTED)
                (report.updated if old[doc.record.doc_id] is not None else report.added).append(doc.record.source)
                note("written", doc.record.source)
            report.chunks_written += len(chunks)
            report.chunks_deleted += len(stale)
        elapsed = time.perf_counter() - group.started
        total = time.perf_counter() - self._started
        log.info(
            "kb.ingest.group",
            kb=self.kb,
            documents=len(docs),
            chunks=len(chunks),
            chunks_per_s=round(len(chunks) / elapsed, 1) if elapsed else None,
            chunks_total=report.chunks_written,
            elapsed_s=round(total, 2),
        )

    def _commit_group(
        self,
        group: list[PreparedDoc],
        old: dict[str, DocRecord | None],
        chunks: list[Chunk],
        vectors: np.ndarray,
    ) -> list[str]:
        """The manifest protocol's steps for a group (see manifest.py); returns the stale ids."""
        # 1. intent: every document of the group is "writing" before any chunk lands.
        intents = []
        for doc in group:
            previous = old[doc.record.doc_id]
            base = previous or replace(doc.record, content_hash="", n_chunks=0)
            intents.append(replace(base, state=WRITING, pending_hash=doc.record.content_hash))
        self.manifest.put(intents)
        # 2. the new chunks.
        for start in range(0, len(chunks), WRITE_BATCH):
            part = chunks[start : start + WRITE_BATCH]
            self.chunks.upsert(
                ids=[c.id for c in part],
                embeddings=vectors[start : start + len(part)],
                documents=[c.text for c in part],
                metadatas=[c.metadata for c in part],
            )
        # 3. commit: the manifest now names the new versions.
        committed = [replace(doc.record, state=WRITING, pending_hash="") for doc in group]
        self.manifest.put(committed)
        # 4. the old versions' chunks go.
        stale: list[str] = []
        for doc in group:
            previous = old[doc.record.doc_id]
            if previous is not None and previous.content_hash and previous.content_hash != doc.record.content_hash:
                stale.extend(chunk_id_for(previous.doc_id, previous.content_hash, i) for i in range(previous.n_chunks))
        for ids in batched(stale, WRITE_BATCH):
            self.chunks.delete(ids=list(ids))
        # 5. done.
        self.manifest.put([replace(record, state=COMMITTED) for record in committed])
        return stale

    @contextlib.contextmanager
    def _settled_on_error(self, group: list[PreparedDoc]) -> Iterator[None]:
        """If a step fails, finish or undo the group's documents now (best effort: what
        this cannot repair, `recover` does on the next open)."""
        try:
            yield
        except BaseException:
            try:
                for record in self.manifest.get([doc.record.doc_id for doc in group]):
                    if record.state != COMMITTED:
                        settle(self.chunks, self.manifest, record)
            except Exception as err:  # the store is failing: leave it to recovery
                log.warning("kb.ingest.settle_failed", kb=self.kb, error=str(err))
            raise

    def remove(self, records: list[DocRecord], report: IngestReport) -> None:
        """Remove documents whole: mark, delete their chunks, then forget them."""
        if not records:
            return
        with interrupts_deferred():
            self.manifest.put([replace(r, state=REMOVING) for r in records])
            ids = [r.doc_id for r in records]
            for part in batched(ids, 100):
                before = self.chunks.count()
                self.chunks.delete(where={"doc_id": {"$in": list(part)}})
                report.chunks_deleted += before - self.chunks.count()
            self.manifest.delete(ids)
        report.removed.extend(r.source for r in records)
        log.info("kb.remove", kb=self.kb, documents=len(records))
