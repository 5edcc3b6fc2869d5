"""KnowledgeService: the one object the CLI, the API and the request pipeline talk to.

It owns the Chroma store (and, when embedded, the store lock), the shared embedding
model, one write lock per knowledge base and the keyword indexes, so that every
caller in a process sees the same, current knowledge.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorag.errors import LoragError
from lorag.knowledge.chunking import Chunker
from lorag.knowledge.embeddings import Embedder, get_embedder
from lorag.knowledge.errors import DocumentNotFound, EmbeddingModelMismatch
from lorag.knowledge.ingest import IngestReport, ProgressFn, Writer
from lorag.knowledge.keyword import KeywordIndex
from lorag.knowledge.manifest import Manifest, recover
from lorag.knowledge.search import KnowledgeSearch
from lorag.knowledge.settings import KnowledgeSettings
from lorag.knowledge.source_files import Skipped, SourceFile, collect_paths
from lorag.knowledge.store import ChromaStore, KBInfo, validate_kb_name
from lorag.knowledge.vector_index import (
    ExactIndex,
    hnsw_configuration,
)
from lorag.logging import get_logger
from lorag.schema import now_iso

if TYPE_CHECKING:
    from collections.abc import Callable

    from lorag.config import Settings

log = get_logger("lorag.knowledge.service")
UPLOAD_PREFIX = "upload:"  # sources of documents uploaded through the API


class KnowledgeService(KnowledgeSearch):
    """Knowledge bases of one store: create/list/show/drop, ingest/remove, query."""

    def __init__(self, settings: KnowledgeSettings, state_path: Path) -> None:
        self.settings = settings
        self.state_path = state_path
        self.store = ChromaStore(settings.chroma, state_path)
        self._embedder: Embedder | None = None
        self._guard = threading.Lock()
        self._kb_locks: dict[str, threading.RLock] = {}
        self._keyword: dict[str, tuple[int, KeywordIndex]] = {}
        self._exact: dict[str, tuple[int, ExactIndex | None]] = {}  # None: the base is searched by HNSW
        self._infos: dict[str, KBInfo] = {}
        self._recovered: dict[str, float] = {}
        self.closed = False

    @classmethod
    def from_settings(cls, settings: Settings) -> KnowledgeService:
        """The service for a configuration; its `[plugins] modules` join the process's plugins,
        so their knowledge readers are used by ingestion."""
        from lorag.plugins.manager import process_plugins

        process_plugins(settings.plugins.modules)
        return cls(settings.knowledge, settings.state_path)

    # -- plumbing -------------------------------------------------------------

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            self._embedder = get_embedder(self.settings.embedding)
        return self._embedder

    def _lock(self, name: str) -> threading.RLock:
        with self._guard:
            return self._kb_locks.setdefault(name, threading.RLock())

    def _info(self, name: str) -> KBInfo:
        """The base's info: cached when we own the store, re-read from a shared server."""
        info = self._infos.get(name)
        if info is None or not self.store.embedded:
            first = info is None
            info = self.store.info(name, refresh=not first)
            self._infos[name] = info
            if first:
                self._apply_search_ef(name)
        self._ensure_recovered(name)
        return self._infos[name]

    def _ensure_recovered(self, name: str, force: bool = False) -> int:
        """Repair documents a crashed writer left half-done (once per process when embedded;
        on every write, and at most once a minute on reads, against a shared server)."""
        now = time.monotonic()
        last = self._recovered.get(name)
        if not force and last is not None and (self.store.embedded or now - last < 60):
            return 0
        with self._lock(name):
            self._recovered[name] = now
            chunks, manifest = self.store.collections(name)
            fixed = recover(
                chunks,
                Manifest(manifest),
                everything=self.store.embedded,
                stale_after_s=self.settings.chroma.stale_writer_s,
            )
            if fixed:
                log.warning("kb.recovered", kb=name, documents=fixed)
                self._changed(name)
            return fixed

    def _changed(self, name: str) -> None:
        revision = self.store.bump_revision(name)
        info = self.store.info(name)
        info.revision = revision
        self._infos[name] = info
        self._keyword.pop(name, None)
        self._exact.pop(name, None)

    def _check_model(self, info: KBInfo) -> None:
        embedder = self.embedder
        if info.embedding_fingerprint != embedder.fingerprint or info.embedding_dim != embedder.dimension:
            raise EmbeddingModelMismatch(
                f"knowledge base {info.name!r} was built with embedding model {info.embedding_model!r} "
                f"({info.embedding_dim} dims, fingerprint {info.embedding_fingerprint}); this process "
                f"uses {embedder.name!r} ({embedder.dimension} dims, fingerprint {embedder.fingerprint}). "
                "Query and extend it with the model it was built with (knowledge.embedding.model), "
                "or create a new knowledge base."
            )

    # -- knowledge bases ----------------------------------------------------------

    def create(self, name: str, description: str = "") -> dict[str, Any]:
        validate_kb_name(name)
        embedder = self.embedder
        chunking = self.settings.chunking
        info = KBInfo(
            name=name,
            embedding_model=embedder.name,
            embedding_fingerprint=embedder.fingerprint,
            embedding_dim=embedder.dimension,
            chunk_size=chunking.chunk_size,
            chunk_overlap=chunking.chunk_overlap,
            splitter=chunking.splitter,
            created_at=now_iso(),
            description=description,
        )
        self.store.create(info, hnsw_configuration(self.settings.vector_index_for(name)))
        self._infos[name] = info
        self._recovered[name] = time.monotonic()
        log.info("kb.create", kb=name, embedding_model=embedder.name)
        return self.summary(name)

    def exists(self, name: str) -> bool:
        return any(info.name == name for info in self.store.list_infos())

    def list_bases(self) -> list[dict[str, Any]]:
        return [self.summary(info.name, info) for info in self.store.list_infos()]

    def summary(self, name: str, info: KBInfo | None = None) -> dict[str, Any]:
        info = info or self.store.info(name)
        chunks, manifest = self.store.collections(name)
        return {
            "name": name,
            "description": info.description,
            "documents": int(manifest.count()),
            "chunks": int(chunks.count()),
            "embedding_model": info.embedding_model,
            "embedding_dim": info.embedding_dim,
            "created_at": info.created_at,
        }

    def show(self, name: str, documents: bool = True) -> dict[str, Any]:
        info = self._info(name)
        chunks, manifest = self.store.collections(name)
        records = sorted(Manifest(manifest).all().values(), key=lambda r: r.source)
        result = self.summary(name, info)
        result.update(
            {
                "embedding_fingerprint": info.embedding_fingerprint,
                "chunking": {"splitter": info.splitter, "chunk_size": info.chunk_size, "chunk_overlap": info.chunk_overlap},
                "bytes": sum(r.bytes for r in records),
                "revision": info.revision,
                "store": self.store.location,
                "fusion": {**self.fusion_for(info).to_settings(), "tuned": info.fusion is not None},
            }
        )
        if documents:
            result["document_list"] = [
                {
                    "source": r.source,
                    "title": r.title,
                    "file_type": r.file_type,
                    "chunks": r.n_chunks,
                    "bytes": r.bytes,
                    "content_hash": r.content_hash,
                    "ingested_at": r.ingested_at,
                    "state": r.state,
                }
                for r in records
            ]
        return result

    def drop(self, name: str) -> None:
        with self._lock(name):
            self.store.drop(name)
            self._infos.pop(name, None)
            self._keyword.pop(name, None)
            self._exact.pop(name, None)
            self._recovered.pop(name, None)
        log.info("kb.drop", kb=name)

    # -- writing ---------------------------------------------------------------

    def ingest_paths(
        self,
        name: str,
        paths: Iterable[str],
        *,
        recursive: bool = True,
        sync: bool = False,
        allowed_roots: list[str] | None = None,
        progress: ProgressFn | None = None,
        create: bool = False,
        corpus: bool = False,
        id_field: str = "_id",
    ) -> IngestReport:
        """Files, folders and globs on this machine (allowed_roots restricts them, for the API).

        Corpus files (corpus.jsonl, or any .jsonl when `corpus`) give one document per record."""
        from lorag.knowledge.corpus import expand_corpora

        collected = expand_corpora(
            collect_paths(paths, recursive=recursive, allowed_roots=allowed_roots), forced=corpus, id_field=id_field
        )
        return self.ingest_files(
            name,
            collected.files,
            skipped=collected.skipped,
            sync_scope=collected.scope if sync else None,
            progress=progress,
            create=create,
        )

    def ingest_files(
        self,
        name: str,
        files: list[SourceFile],
        *,
        skipped: Iterable[Skipped] = (),
        sync_scope: Callable[[str], bool] | None = None,
        progress: ProgressFn | None = None,
        create: bool = False,
        writer: Callable[..., Writer] = Writer,
        chunker: Callable[[Any, Any], Chunker] = Chunker,
    ) -> IngestReport:
        """Ingest `files` under the base's lock, after recovery and the embedding-model check; its
        indexes are invalidated after. `writer` and `chunker` make the Writer and its Chunker
        (lorag.knowledge.llama_write passes ones for documents that are already read)."""
        if create and not self.exists(name):
            self.create(name)
        with self._lock(name):
            report = IngestReport(kb=name, skipped=list(skipped))
            report.recovered = self._ensure_recovered(name, force=not self.store.embedded)
            info = self._info(name)
            self._check_model(info)
            chunks, manifest = self.store.collections(name)
            made = writer(
                name, chunks, Manifest(manifest), self.settings.ingest, self.embedder, chunker(info, self.embedder)
            )
            try:
                made.ingest(files, report, sync_scope=sync_scope, progress=progress)
            finally:
                if report.added or report.updated or report.removed:
                    self._changed(name)
            return report

    def remove(self, name: str, sources: Iterable[str]) -> IngestReport:
        """Remove documents by source (exact, or every document under a folder)."""
        wanted = [s for s in sources if s]
        if not wanted:
            raise LoragError("no documents named to remove", param="sources")
        with self._lock(name):
            self._ensure_recovered(name, force=not self.store.embedded)
            self._info(name)
            chunks, manifest_collection = self.store.collections(name)
            manifest = Manifest(manifest_collection)
            records = manifest.all()
            by_source = {r.source: r for r in records.values()}
            chosen = {}
            missing = []
            for source in wanted:
                candidates = [source]
                if not source.startswith(("/", UPLOAD_PREFIX)):
                    candidates.append(os.path.abspath(os.path.expanduser(source)))  # a relative path
                found = [by_source[c] for c in candidates if c in by_source]
                if not found:
                    prefixes = [c.rstrip("/") + "/" for c in candidates]
                    found = [r for s, r in by_source.items() if any(s.startswith(p) for p in prefixes)]
                if not found:
                    missing.append(source)
                for record in found:
                    chosen[record.doc_id] = record
            if missing:
                raise DocumentNotFound(
                    f"knowledge base {name!r} has no document {', '.join(repr(m) for m in missing)}",
                    param="sources",
                )
            report = IngestReport(kb=name)
            writer = Writer(name, chunks, manifest, self.settings.ingest)
            try:
                writer.remove(list(chosen.values()), report)
            finally:
                self._changed(name)
            return report

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.store.close()
