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
from lorag.knowledge.embeddings import Embedder, get_embedder, get_reranker
from lorag.knowledge.errors import DocumentNotFound, EmbeddingModelMismatch
from lorag.knowledge.filters import normalize
from lorag.knowledge.fusion import Fusion, fuse
from lorag.knowledge.ingest import (
    Chunker,
    IngestReport,
    ProgressFn,
    Skipped,
    SourceFile,
    Writer,
    collect_paths,
)
from lorag.knowledge.keyword import KeywordIndex, load_index
from lorag.knowledge.manifest import Manifest, recover
from lorag.knowledge.retrieval import (
    Candidate,
    Hit,
    RetrievedLists,
    by_score,
    check_mode,
    public_metadata,
    vector_search,
)
from lorag.knowledge.settings import KnowledgeSettings
from lorag.knowledge.store import ChromaStore, KBInfo, now_iso, validate_kb_name
from lorag.knowledge.vector_index import (
    ExactIndex,
    apply_search_ef,
    hnsw_configuration,
    load_exact_index,
)
from lorag.logging import get_logger, stage

if TYPE_CHECKING:
    from collections.abc import Callable

    from lorag.config import Settings

log = get_logger("lorag.knowledge.service")
UPLOAD_PREFIX = "upload:"  # sources of documents uploaded through the API


class KnowledgeService:
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
    ) -> IngestReport:
        if create and not self.exists(name):
            self.create(name)
        with self._lock(name):
            report = IngestReport(kb=name, skipped=list(skipped))
            report.recovered = self._ensure_recovered(name, force=not self.store.embedded)
            info = self._info(name)
            self._check_model(info)
            chunks, manifest = self.store.collections(name)
            writer = Writer(
                name, chunks, Manifest(manifest), self.settings.ingest, self.embedder, Chunker(info, self.embedder)
            )
            try:
                writer.ingest(files, report, sync_scope=sync_scope, progress=progress)
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

    # -- reading ---------------------------------------------------------------

    def keyword_index(self, name: str) -> KeywordIndex:
        info = self._info(name)
        cached = self._keyword.get(name)
        if cached is not None and cached[0] == info.revision:
            return cached[1]
        with self._lock(name):
            cached = self._keyword.get(name)
            if cached is not None and cached[0] == info.revision:
                return cached[1]
            chunks, _ = self.store.collections(name)
            index = load_index(chunks, name, self.settings.retrieval.bm25_language)
            self._keyword[name] = (info.revision, index)
            return index

    def warm(self, name: str) -> None:
        """Load what a base's first query would (a server's start-up warm-up): its info and
        recovery, BM25 index, Chroma collection and vector index, the reranker if configured."""
        self.keyword_index(name)
        self.query([name], "warm-up", top_k=1, mode="vector")

    def query(
        self,
        kbs: list[str] | str,
        query: str,
        *,
        top_k: int | None = None,
        mode: str | None = None,
        filters: dict[str, Any] | None = None,
        score_threshold: float | None = None,
        rerank: bool | None = None,
    ) -> list[Hit]:
        """Ranked hits, best first, across one or more knowledge bases."""
        cfg = self.settings.retrieval
        names = [kbs] if isinstance(kbs, str) else list(dict.fromkeys(kbs))
        if not names:
            raise LoragError("name at least one knowledge base to query", param="kb")
        if not isinstance(query, str) or not query.strip():
            raise LoragError("the query is empty", param="query")
        mode = check_mode(mode or cfg.mode)
        top_k = cfg.top_k if top_k is None else top_k
        if not 1 <= top_k <= 1000:
            raise LoragError("top_k must be between 1 and 1000", param="top_k")
        threshold = cfg.score_threshold if score_threshold is None else score_threshold
        where = normalize(filters)
        infos = [self._info(name) for name in names]
        for info in infos:
            self._check_model(info)
        use_reranker = bool(cfg.reranker_model) if rerank is None else rerank
        if use_reranker and not cfg.reranker_model:
            raise LoragError("reranking needs knowledge.retrieval.reranker_model", param="rerank")
        depth = top_k
        if mode == "hybrid":
            depth = max(top_k, cfg.candidates)
        if use_reranker:
            depth = max(depth, cfg.rerank_candidates)

        with stage(log, "kb.retrieve", kbs=names, mode=mode, top_k=top_k) as extra:
            # Texts and metadata come from the keyword index when it is at hand (cheaper than
            # asking Chroma for them); vector-only queries do not build one.
            indexes = (
                {name: self.keyword_index(name) for name in names}
                if mode != "vector"
                else {name: index for name in names if (index := self._fresh_index(name, infos)) is not None}
            )
            vector = self.embedder.encode_query(query).tolist() if mode != "keyword" else None
            found = [self.retrieve_lists(name, query, depth, mode, where, vector, indexes.get(name)) for name in names]
            ranked: list[tuple[Candidate, float]]
            if mode == "hybrid":
                fused = [
                    pair
                    for lists, info in zip(found, infos, strict=True)
                    for pair in fuse(lists.vector, lists.keyword, self.fusion_for(info), lists.keyword_score)
                ]
                ranked = sorted(fused, key=lambda pair: pair[1], reverse=True) if len(found) > 1 else fused
            else:
                ranked = [(c, c.score) for c in by_score([c for lists in found for c in lists.vector + lists.keyword])]
            if mode != "keyword":
                needed = ranked[: max(top_k, cfg.rerank_candidates if use_reranker else 0)]
                self._fill_payloads([c for c, _ in needed], indexes)
                ranked = needed
            if use_reranker and ranked:
                pool = [c for c, _ in ranked[: cfg.rerank_candidates]]
                assert cfg.reranker_model
                scores = get_reranker(cfg.reranker_model, self.settings.embedding.device).score(
                    query, [c.text for c in pool]
                )
                ranked = sorted(zip(pool, scores, strict=True), key=lambda pair: pair[1], reverse=True)
            if threshold is not None:
                ranked = [(c, s) for c, s in ranked if s >= threshold]
            results: list[Hit] = []
            for candidate, score in ranked[:top_k]:
                hit = candidate.to_hit(score)
                hit.metadata = public_metadata(hit.metadata)
                results.append(hit)
            extra["hits"] = len(results)
        return results

    def retrieve_lists(
        self,
        name: str,
        query: str,
        depth: int,
        mode: str = "hybrid",
        where: dict[str, Any] | None = None,
        vector: list[float] | None = None,
        index: KeywordIndex | None = None,
    ) -> RetrievedLists:
        """One base's raw vector and keyword lists (best first, `depth` each), before fusion.

        Vector candidates carry ids and scores only when `index` can fill in their payloads
        later (see _fill_payloads); `lorag kb eval` scores every fusion from these lists.
        """
        lists = RetrievedLists(name)
        if mode != "keyword":
            if vector is None:
                vector = self.embedder.encode_query(query).tolist()
            chunks, _ = self.store.collections(name)
            lists.vector = self._vector_search(name, chunks, vector, depth, where, payload=index is None)
        if mode != "vector":
            index = index or self.keyword_index(name)
            hits, lists.keyword_score = index.search_scored(query, depth, where)
            lists.keyword = [Candidate(name, h.id, h.text, h.metadata, h.score) for h in hits]
        return lists

    def fusion_for(self, info: KBInfo) -> Fusion:
        """The configured fusion, or what `lorag kb tune` stored for this base."""
        return Fusion.from_settings(self.settings.retrieval, info.fusion)

    def set_fusion(self, name: str, fusion: Fusion | None) -> None:
        """Store (None: forget) a base's own fusion settings; every process sees them."""
        with self._lock(name):
            info = self.store.info(name, refresh=not self.store.embedded)
            info.fusion = fusion.to_settings() if fusion is not None else None
            self.store.write_info(info)
            self._infos[name] = self.store.info(name)
        log.info("kb.fusion.set", kb=name, fusion=info.fusion)

    def _vector_search(
        self, name: str, chunks: Any, vector: list[float], depth: int, where: dict[str, Any] | None, payload: bool
    ) -> list[Candidate]:
        """Exact search while the base is small enough (the same answer whatever order its
        chunks were written in), Chroma's HNSW above (see vector_index.py)."""
        exact = self._exact_index(name)
        if exact is None:
            return vector_search(chunks, name, vector, depth, where, payload=payload)
        return [Candidate(name, h.id, h.text, dict(h.metadata), h.score) for h in exact.search(vector, depth, where)]

    def _exact_index(self, name: str) -> ExactIndex | None:
        """This revision's exact index, or None when the base has more than exact_max_chunks."""
        revision = self._info(name).revision
        cached = self._exact.get(name)
        if cached is not None and cached[0] == revision:
            return cached[1]
        with self._lock(name):
            cached = self._exact.get(name)
            if cached is not None and cached[0] == revision:
                return cached[1]
            chunks, _ = self.store.collections(name)
            limit = self.settings.vector_index_for(name).exact_max_chunks
            index = load_exact_index(chunks) if limit and chunks.count() <= limit else None
            self._exact[name] = (revision, index)
            return index

    def _apply_search_ef(self, name: str) -> None:
        """Give an existing base the configured hnsw ef_search before this process searches it."""
        try:
            chunks, _ = self.store.collections(name)
            if apply_search_ef(chunks, self.settings.vector_index_for(name).hnsw_search_ef):
                log.info("kb.hnsw.search_ef", kb=name, search_ef=self.settings.vector_index_for(name).hnsw_search_ef)
        except Exception as err:  # e.g. a Chroma server that cannot modify it: search still works
            log.warning("kb.hnsw.search_ef_failed", kb=name, error=str(err))

    def _fresh_index(self, name: str, infos: list[KBInfo]) -> KeywordIndex | None:
        cached = self._keyword.get(name)
        revision = next(info.revision for info in infos if info.name == name)
        return cached[1] if cached is not None and cached[0] == revision else None

    def _fill_payloads(self, candidates: list[Candidate], indexes: dict[str, KeywordIndex]) -> None:
        """Text and metadata for id-only vector candidates: from the keyword index, else Chroma."""
        missing: dict[str, list[Candidate]] = {}
        for candidate in candidates:
            if candidate.metadata:
                continue
            found = indexes[candidate.kb].payload(candidate.id) if candidate.kb in indexes else None
            if found is None:
                missing.setdefault(candidate.kb, []).append(candidate)
            else:
                candidate.text, candidate.metadata = found[0], dict(found[1])
        for name, group in missing.items():
            chunks, _ = self.store.collections(name)
            got = chunks.get(ids=[c.id for c in group], include=["documents", "metadatas"])
            rows = {i: (d or "", dict(m or {})) for i, d, m in zip(got["ids"], got["documents"], got["metadatas"], strict=False)}
            for candidate in group:
                candidate.text, candidate.metadata = rows.get(candidate.id, ("", {}))

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.store.close()
