"""Retrieval: vector search (Chroma), keyword search (BM25) and their fusion, with citations.

Scores, best first:
* vector: cosine similarity in [-1, 1] (Chroma's cosine distance is 1 - similarity);
* keyword: the BM25 score;
* hybrid: the base's fusion (lorag.knowledge.fusion): a convex combination of normalised
  scores, or weighted reciprocal rank fusion normalised so 1.0 means "first in every list";
* reranked: the cross-encoder's score.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from lorag.errors import LoragError

MODES = ("vector", "keyword", "hybrid")
# Chunk metadata that is bookkeeping, not something a citation shows.
_INTERNAL = ("doc_id", "content_hash")


@dataclass
class Hit:
    """One retrieved chunk with everything a citation needs."""

    kb: str
    source: str
    location: str
    text: str
    score: float
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def chunk_id(self) -> str:
        return str(self.metadata.get("chunk_id", ""))

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "text": self.text,
            "score": self.score,
            "metadata": self.metadata,
            "kb": self.kb,
            "location": self.location,
        }


@dataclass
class Candidate:
    kb: str
    id: str
    text: str
    metadata: dict[str, Any]
    score: float

    def key(self) -> tuple[str, str]:
        return (self.kb, self.id)

    def to_hit(self, score: float) -> Hit:
        meta = dict(self.metadata)
        meta["chunk_id"] = self.id
        meta["kb"] = self.kb
        return Hit(
            kb=self.kb,
            source=str(meta.get("source", "")),
            location=str(meta.get("location", "")),
            text=self.text,
            score=round(float(score), 6),
            metadata=meta,
        )


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise LoragError(f"unknown retrieval mode {mode!r} (use {', '.join(MODES)})", param="mode")
    return mode


def vector_search(
    collection: Any,
    kb: str,
    vector: Sequence[float],
    k: int,
    where: dict[str, Any] | None,
    payload: bool = True,
) -> list[Candidate]:
    """Nearest chunks by cosine similarity (the collection is created with space=cosine).

    payload=False fetches ids and distances only (text and metadata then come from the
    keyword index): materialising 50 candidates' payloads costs more than the search.
    """
    if k <= 0:
        return []
    result = collection.query(
        query_embeddings=[vector],
        n_results=k,
        where=where,
        include=["documents", "metadatas", "distances"] if payload else ["distances"],
    )
    ids = result["ids"][0] if result["ids"] else []
    docs = (result.get("documents") or [[]])[0] or [""] * len(ids)
    metas = (result.get("metadatas") or [[]])[0] or [{}] * len(ids)
    dists = (result.get("distances") or [[]])[0] or []
    return [
        Candidate(kb, i, d or "", dict(m or {}), 1.0 - float(dist))
        for i, d, m, dist in zip(ids, docs, metas, dists, strict=True)
    ]


def by_score(candidates: list[Candidate]) -> list[Candidate]:
    return sorted(candidates, key=lambda c: c.score, reverse=True)


@dataclass
class RetrievedLists:
    """One base's vector and keyword lists for one query, best first, before fusion."""

    kb: str
    vector: list[Candidate] = field(default_factory=list)
    keyword: list[Candidate] = field(default_factory=list)
    # The BM25 score of any chunk of the base for this query (None: not in the index).
    keyword_score: Callable[[str], float | None] | None = None


def public_metadata(meta: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in meta.items() if k not in _INTERNAL}
