"""Reading knowledge bases: vector, keyword and hybrid search with fusion, reranking and
filters, over every base a query names. A part of KnowledgeService (lorag.knowledge.service),
kept apart because it is the hot path and the rest is administration.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from lorag.errors import LoragError
from lorag.knowledge.embeddings import Embedder, get_reranker
from lorag.knowledge.filters import normalize
from lorag.knowledge.fusion import Fusion, fuse
from lorag.knowledge.keyword import KeywordIndex, load_index
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
from lorag.knowledge.store import ChromaStore, KBInfo
from lorag.knowledge.vector_index import (
    ExactIndex,
    apply_search_ef,
    load_exact_index,
)
from lorag.logging import get_logger, stage

log = get_logger("lorag.knowledge.search")


# A filtered query asks HNSW for this many times the chunks the filter's share would yield.
_OVERFETCH = 2.0
_OVERFETCH_MAX = 2000  # beyond this (a very narrow filter) Chroma's pre-filter is the faster path


def post_filtered(
    chunks: Any,
    kb: str,
    vector: list[float],
    depth: int,
    allowed: np.ndarray,
    position: Callable[[str], int | None],
) -> list[Candidate] | None:
    """The `depth` best chunks a filter allows, from an unfiltered HNSW search, or None
    when that search could not show them.

    Chroma answers an HNSW query with a `where` by pre-filtering in SQLite and then
    searching with the allowed ids: ~175 ms at 100k chunks for a filter keeping 30% of them.
    The keyword index already knows every chunk's metadata (`allowed`, by index position), so
    HNSW is asked unfiltered for depth / share x 2 chunks and the allowed ones kept. If at
    least `depth` survive they are the filtered top `depth` (anything more similar would
    have been in the list too); otherwise the filtered search runs after all.
    """
    share = float(np.count_nonzero(allowed)) / max(len(allowed), 1)
    if share == 0.0:
        return []
    wanted = min(len(allowed), max(depth, math.ceil(depth / share * _OVERFETCH)))
    if wanted > _OVERFETCH_MAX:
        return None
    found = vector_search(chunks, kb, vector, wanted, None, payload=False)
    kept = [c for c in found if (n := position(c.id)) is not None and allowed[n]]
    looked_at_all = wanted >= len(allowed) or len(found) < wanted
    return kept[:depth] if len(kept) >= depth or looked_at_all else None


class KnowledgeSearch:
    """The query side of KnowledgeService; the attributes below are the service's."""

    if TYPE_CHECKING:
        settings: KnowledgeSettings
        store: ChromaStore
        closed: bool
        _guard: threading.Lock
        _keyword: dict[str, tuple[int, KeywordIndex]]
        _exact: dict[str, tuple[int, ExactIndex | None]]
        _infos: dict[str, KBInfo]

        @property
        def embedder(self) -> Embedder: ...

        def _info(self, name: str) -> KBInfo: ...

        def _lock(self, name: str) -> threading.RLock: ...

        def _ensure_recovered(self, name: str, force: bool = False) -> int: ...

        def _check_model(self, info: KBInfo) -> None: ...

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
            lists.vector = self._vector_search(name, chunks, vector, depth, where, index)
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
        self, name: str, chunks: Any, vector: list[float], depth: int, where: dict[str, Any] | None,
        index: KeywordIndex | None,
    ) -> list[Candidate]:
        """Exact search while the base is small enough (the same answer whatever order its
        chunks were written in), Chroma's HNSW above (see vector_index.py). Candidates carry
        ids and scores only when `index` can fill in their payloads later."""
        exact = self._exact_index(name)
        if exact is not None:
            return [Candidate(name, h.id, h.text, dict(h.metadata), h.score) for h in exact.search(vector, depth, where)]
        if where and index is not None:
            found = post_filtered(chunks, name, vector, depth, index.allowed(where), index.position)
            if found is not None:
                return found
        return vector_search(chunks, name, vector, depth, where, payload=index is None)

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
