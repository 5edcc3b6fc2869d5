"""Vector search that gives the same answer whatever order the chunks were written in.

Chroma's HNSW graph is approximate and shaped by insertion order, so a knowledge base
rebuilt after a crash (or ingested in another order) can rank differently although every
embedding is identical. Small bases are therefore searched exactly here: a brute-force
dot product over the stored unit vectors, ties broken by chunk id. Above
`exact_max_chunks` Chroma's HNSW answers, built with enough neighbours and ef for
recall@100 >= 0.99 (benchmarks/ann_recall.py has the figures).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lorag.knowledge.filters import FilterMasks
from lorag.knowledge.settings import VectorIndexSettings

_PAGE = 5000  # rows per Chroma get while loading


def hnsw_configuration(settings: VectorIndexSettings) -> dict[str, Any]:
    """The chunk collection's configuration at creation (Chroma >= 1.0 names)."""
    return {
        "hnsw": {
            "space": "cosine",
            "max_neighbors": settings.hnsw_m,
            "ef_construction": settings.hnsw_construction_ef,
            "ef_search": settings.hnsw_search_ef,
        }
    }


def apply_search_ef(collection: Any, search_ef: int) -> bool:
    """Set the base's hnsw ef_search if it differs; True when changed.

    Chroma reads it when it loads the index (a process's first query of the base), so
    this runs when a process first opens a base.
    """
    current = ((getattr(collection, "configuration", None) or {}).get("hnsw") or {}).get("ef_search")
    if current == search_ef:
        return False
    collection.modify(configuration={"hnsw": {"ef_search": search_ef}})
    return True


# Scores closer than this are ties, ranked by chunk id. An embedding depends in its last
# bits on the batch it was computed in (padding changes the matmul shapes), so identical
# texts ingested in different orders score ~1e-7 apart; a real difference is far larger.
TIE = 1e-5


def similarities(matrix: np.ndarray, query: np.ndarray) -> np.ndarray:
    """`matrix @ query` on torch's thread pool, the one that just embedded the query.

    numpy's OpenBLAS keeps a pool of its own whose threads spin after each call; on a
    2-core machine they then fight torch's threads for the cores, and the next query
    embedding took 4x as long (hybrid p50 at 10k chunks: 27 ms with numpy, 14 ms without).
    """
    import torch

    product: np.ndarray = (torch.from_numpy(matrix) @ torch.from_numpy(query)).numpy()
    return product


def _ties_by_position(ranked: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Best-first positions with each run of near-equal scores put in position (id) order and
    given the run's best score, so that a later sort by score keeps that order."""
    if len(ranked) < 2:
        return ranked, scores
    runs = np.split(np.arange(len(ranked)), np.flatnonzero(scores[:-1] - scores[1:] >= TIE) + 1)
    order = np.concatenate([np.sort(ranked[run]) for run in runs])
    snapped = np.concatenate([np.full(len(run), scores[run[0]]) for run in runs])
    return order, snapped


@dataclass
class ExactHit:
    id: str
    score: float  # cosine similarity
    text: str
    metadata: dict[str, Any]


class ExactIndex:
    """Every chunk vector of one revision of a base, normalised, in chunk-id order."""

    def __init__(self, ids: list[str], vectors: np.ndarray, texts: list[str], metadatas: list[dict[str, Any]]) -> None:
        order = sorted(range(len(ids)), key=ids.__getitem__)
        self.ids = [ids[n] for n in order]
        self.texts = [texts[n] for n in order]
        self.metadatas = [metadatas[n] for n in order]
        matrix = np.asarray(vectors, dtype=np.float32).reshape(len(ids), -1)[order] if ids else np.zeros((0, 0), np.float32)
        norms = np.linalg.norm(matrix, axis=1, keepdims=True) if len(ids) else np.ones((0, 1), np.float32)
        self.matrix = np.ascontiguousarray(matrix / np.where(norms > 0, norms, 1.0), dtype=np.float32)
        self._filters = FilterMasks(self.metadatas, bool)

    def __len__(self) -> int:
        return len(self.ids)

    def search(self, vector: Sequence[float], k: int, where: dict[str, Any] | None = None) -> list[ExactHit]:
        """The k most similar chunks, best first; equal scores in chunk-id order."""
        if k <= 0 or not self.ids:
            return []
        query = np.asarray(vector, dtype=np.float32)
        query = query / (np.linalg.norm(query) or 1.0)
        scores = similarities(self.matrix, query)
        allowed = np.flatnonzero(self._mask(where)) if where else None
        if allowed is not None:
            scores = scores[allowed]
        k = min(k, len(scores))
        if k == 0:
            return []
        # Everything (nearly) tied with the k-th best competes for the last places.
        kth = np.partition(scores, len(scores) - k)[len(scores) - k]
        pool = np.flatnonzero(scores >= kth - TIE)
        ranked = pool[np.argsort(-scores[pool], kind="stable")]
        best, best_scores = _ties_by_position(ranked, scores[ranked])
        rows = allowed[best[:k]] if allowed is not None else best[:k]
        return [
            ExactHit(self.ids[n], float(score), self.texts[n], self.metadatas[n])
            for n, score in zip(rows.tolist(), best_scores[:k].tolist(), strict=True)
        ]

    def _mask(self, where: dict[str, Any]) -> np.ndarray:
        mask: np.ndarray = self._filters.get(where)
        return mask


def load_exact_index(collection: Any) -> ExactIndex:
    """Read every chunk's embedding, text and metadata from Chroma."""
    ids: list[str] = []
    texts: list[str] = []
    metas: list[dict[str, Any]] = []
    parts: list[np.ndarray] = []
    total = int(collection.count())
    for offset in range(0, total, _PAGE):
        page = collection.get(include=["embeddings", "documents", "metadatas"], limit=_PAGE, offset=offset)
        if not page["ids"]:
            break
        ids.extend(page["ids"])
        texts.extend(d or "" for d in page["documents"] or [])
        metas.extend(dict(m or {}) for m in page["metadatas"] or [])
        parts.append(np.asarray(page["embeddings"], dtype=np.float32))
    vectors = np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
    return ExactIndex(ids, vectors, texts, metas)
