"""Ingestion: files -> segments -> chunks (llama-index splitters) -> embeddings -> Chroma.

Incremental and idempotent: a document is keyed by its source and versioned by the
sha256 of its bytes, so an unchanged file costs one hash and adds nothing, a changed
file replaces its chunks, and `--sync` removes documents whose files disappeared.
Documents are written in groups through the manifest protocol (see manifest.py),
which keeps every document whole across Ctrl-C and kill -9.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import re
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from lorag.knowledge.critical import interrupts_deferred
from lorag.knowledge.embeddings import Embedder
from lorag.knowledge.errors import IngestInputError, PathNotAllowed
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
    ReadResult,
    UnreadableFile,
    UnsupportedFile,
    file_type_of,
    location_of,
    read_bytes,
)
from lorag.knowledge.settings import IngestSettings
from lorag.knowledge.store import KBInfo, now_iso
from lorag.logging import get_logger
from lorag.paths import inside_roots

log = get_logger("lorag.knowledge.ingest")

_GLOB_CHARS = re.compile(r"[*?\[]")
_LOOKAHEAD = 16  # documents read and split ahead of the one being written


# ---------------------------------------------------------------------------- inputs


@dataclass
class SourceFile:
    """One document to ingest: a file on disk, or bytes (an upload) under a source name."""

    source: str
    name: str  # picks the reader by extension
    path: Path | None = None
    data: bytes | None = None
    origin: str = "path"

    def size(self) -> int:
        return len(self.data) if self.data is not None else (self.path.stat().st_size if self.path else 0)

    def read(self) -> bytes:
        if self.data is not None:
            return self.data
        assert self.path is not None
        return self.path.read_bytes()


@dataclass
class Skipped:
    source: str
    reason: str
    kind: str  # "unsupported" | "unreadable" | "empty" | "too_large" | "not_allowed" | "empty_record"

    def to_dict(self) -> dict[str, str]:
        return {"source": self.source, "reason": self.reason, "kind": self.kind}


@dataclass
class Collected:
    files: list[SourceFile]
    skipped: list[Skipped]
    scope: Callable[[str], bool]  # which existing sources these inputs cover (for --sync)


def collect_paths(
    inputs: Iterable[str], *, recursive: bool = True, allowed_roots: list[str] | None = None
) -> Collected:
    """Expand files, folders and globs; refuse missing paths before anything is written."""
    files: dict[str, SourceFile] = {}
    skipped: list[Skipped] = []
    scopes: list[Callable[[str], bool]] = []
    roots = [Path(r).expanduser().resolve() for r in allowed_roots] if allowed_roots is not None else None
    inputs = list(inputs)
    if not inputs:
        raise IngestInputError("no paths given to ingest", param="paths")

    def allowed(path: Path) -> bool:
        if roots is None:
            return True
        return inside_roots(path, roots) is not None

    def add_file(path: Path, explicit: bool) -> None:
        source = os.path.abspath(path)
        if not allowed(path):
            skipped.append(Skipped(source, "outside the allowed roots", "not_allowed"))
            return
        if not explicit and file_type_of(path.name) is None:
            skipped.append(Skipped(source, f"unsupported file type {path.suffix or '(none)'!r}", "unsupported"))
            return
        files.setdefault(source, SourceFile(source=source, name=path.name, path=path))

    for raw in inputs:
        text = os.path.expanduser(raw)
        path = Path(text)
        if roots is not None and (path.exists() or not _GLOB_CHARS.search(text)):
            if not path.is_absolute():
                raise PathNotAllowed(f"server-side paths must be absolute: {raw}", param="paths")
            if not allowed(path):
                raise PathNotAllowed(
                    f"{raw} is outside the allowed roots (knowledge.ingest.allowed_roots)", param="paths"
                )
        if path.is_file():
            add_file(path, explicit=True)
            scopes.append(_exact(os.path.abspath(path)))
        elif path.is_dir():
            base = os.path.abspath(path)
            for file in _walk(path, recursive):
                add_file(file, explicit=False)
            scopes.append(_under(base, recursive))
        elif _GLOB_CHARS.search(text):
            pattern = os.path.abspath(text)
            if roots is not None and inside_roots(_glob_base(pattern), roots) is None:
                raise PathNotAllowed(f"{raw} is outside the allowed roots", param="paths")
            matches = sorted(glob.glob(pattern, recursive=True))
            matched_files = [Path(m) for m in matches if Path(m).is_file() and not _hidden(Path(m))]
            if not matched_files:
                raise IngestInputError(f"no files match {raw}", param="paths")
            for file in matched_files:
                add_file(file, explicit=False)
            scopes.append(_glob_scope(pattern))
        elif path.exists():
            raise IngestInputError(f"not a regular file or folder: {raw}", param="paths")
        else:
            raise IngestInputError(f"no such file or directory: {raw}", param="paths")
    return Collected(files=list(files.values()), skipped=skipped, scope=lambda s: any(f(s) for f in scopes))


def _hidden(path: Path) -> bool:
    return any(part.startswith(".") and part not in (".", "..") for part in path.parts)


def _walk(root: Path, recursive: bool) -> Iterator[Path]:
    """Regular files under a folder, sorted, skipping hidden files and folders (.git, ...)."""
    if not recursive:
        yield from sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith("."))
        return
    for current, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if not name.startswith("."):
                path = Path(current) / name
                if path.is_file():
                    yield path


def _exact(source: str) -> Callable[[str], bool]:
    return lambda s: s == source


def _under(base: str, recursive: bool) -> Callable[[str], bool]:
    prefix = base.rstrip("/") + "/"
    if recursive:
        return lambda s: s.startswith(prefix)
    return lambda s: s.startswith(prefix) and "/" not in s[len(prefix) :]


def _glob_base(pattern: str) -> str:
    parts = Path(pattern).parts
    base = [p for p in parts[: next((i for i, p in enumerate(parts) if _GLOB_CHARS.search(p)), len(parts))]]
    return os.path.join(*base) if base else "/"


def _glob_scope(pattern: str) -> Callable[[str], bool]:
    """glob semantics as a regex: `*` stays within one folder, `**/` spans folders."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[":
            end = pattern.find("]", i + 1)
            if end == -1:
                out.append(re.escape(pattern[i]))
                i += 1
            else:
                body = pattern[i + 1 : end]
                out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
                i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    regex = re.compile("".join(out) + r"\Z")
    return lambda s: regex.match(s) is not None


# ---------------------------------------------------------------------------- chunking


class Chunker:
    """llama-index splitter measured in the embedding model's tokens."""

    def __init__(self, info: KBInfo, embedder: Embedder) -> None:
        from llama_index.core.node_parser import SentenceSplitter, TokenTextSplitter

        # Leave room for the special tokens the model adds ([CLS], [SEP]).
        size = min(info.chunk_size, max(16, embedder.max_tokens - 4))
        overlap = min(info.chunk_overlap, size // 2)
        self.splitter: Any
        if info.splitter == "token":
            self.splitter = TokenTextSplitter(chunk_size=size, chunk_overlap=overlap, tokenizer=embedder.count_tokens)
        else:
            self.splitter = SentenceSplitter(
                chunk_size=size, chunk_overlap=overlap, tokenizer=embedder.count_tokens, include_prev_next_rel=False
            )

    def split(self, text: str) -> list[str]:
        return [piece for piece in self.splitter.split_text(text) if piece.strip()]


@dataclass
class Chunk:
    id: str
    text: str
    metadata: dict[str, Any]


@dataclass
class PreparedDoc:
    record: DocRecord  # what the manifest will hold once committed
    chunks: list[Chunk]


def prepare(file: SourceFile, data: bytes, content_hash: str, read: ReadResult, chunker: Chunker) -> PreparedDoc:
    """Cut a read document into chunks with the metadata a citation needs."""
    doc_id = doc_id_for(file.source)
    ingested_at = now_iso()
    chunks: list[Chunk] = []
    for segment in read.segments:
        for piece in chunker.split(segment.text):
            index = len(chunks)
            meta: dict[str, Any] = {
                "source": file.source,
                "doc_id": doc_id,
                "title": segment.title or read.title,
                "file_type": read.file_type,
                "origin": file.origin,
                "content_hash": content_hash,
                "chunk_index": index,
                "ingested_at": ingested_at,
                "location": location_of(segment.page, segment.section),
            }
            if segment.page is not None:
                meta["page"] = segment.page
            if segment.section:
                meta["section"] = segment.section
            chunks.append(Chunk(chunk_id_for(doc_id, content_hash, index), piece, meta))
    record = DocRecord(
        doc_id=doc_id,
        source=file.source,
        content_hash=content_hash,
        n_chunks=len(chunks),
        bytes=len(data),
        title=read.title,
        file_type=read.file_type,
        origin=file.origin,
        ingested_at=ingested_at,
    )
    return PreparedDoc(record, chunks)


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
        group: list[PreparedDoc] = []
        group_chunks = 0
        log.info("kb.ingest.start", kb=self.kb, files=len(files), documents=len(records))
        for file, prepared in self._prepared_ahead(files, records, report):
            seen.add(file.source)
            if isinstance(prepared, str):
                note(prepared, file.source)
                continue
            group.append(prepared)
            group_chunks += len(prepared.chunks)
            if group_chunks >= self.settings.group_chunks:
                self._write_group(group, records, report, note)
                group, group_chunks = [], 0
        if group:
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
    ) -> Iterator[tuple[SourceFile, PreparedDoc | str]]:
        """Read and split the next documents in a thread while this one embeds the current
        group (torch releases the GIL); a bounded look-ahead keeps memory flat."""
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
                yield file, future.result()
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
            read = read_bytes(file.name, data)
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

    def _write_group(
        self,
        group: list[PreparedDoc],
        records: dict[str, DocRecord],
        report: IngestReport,
        note: Callable[[str, str], None],
    ) -> None:
        assert self.embedder is not None
        started = time.perf_counter()
        old = {doc.record.doc_id: records.get(doc.record.doc_id) for doc in group}
        # Embedding is the slow part and writes nothing: it runs before the critical section,
        # where a Ctrl-C simply stops ingestion with the knowledge base untouched.
        chunks = [chunk for doc in group for chunk in doc.chunks]
        vectors = self.embedder.encode_documents([c.text for c in chunks])
        with interrupts_deferred():  # the report too: a held Ctrl-C must not hide a committed group
            with self._settled_on_error(group):
                stale = self._commit_group(group, old, chunks, vectors)
            for doc in group:
                records[doc.record.doc_id] = replace(doc.record, state=COMMITTED)
                (report.updated if old[doc.record.doc_id] is not None else report.added).append(doc.record.source)
                note("written", doc.record.source)
            report.chunks_written += len(chunks)
            report.chunks_deleted += len(stale)
        elapsed = time.perf_counter() - started
        total = time.perf_counter() - self._started
        log.info(
            "kb.ingest.group",
            kb=self.kb,
            documents=len(group),
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
