"""`lorag kb eval`: how well a knowledge base retrieves, on its own judged queries.

Each judged query is run once per retriever (`depth` chunks each); every mode is then
scored from those same lists, so modes and fusions are compared on equal terms and a
fusion sweep (`kb tune`, the benchmark) costs no extra searches. A document ranks by its
best chunk. Hybrid uses the base's fusion (its own from `kb tune`, else the configured
default) over lists of `depth` chunks each (queries fuse `candidates` per retriever).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lorag.errors import LoragError
from lorag.knowledge.corpus import document_ref
from lorag.knowledge.fusion import Fusion, fuse
from lorag.knowledge.judged import JudgedSet
from lorag.knowledge.manifest import Manifest
from lorag.knowledge.metrics import METRICS, mean_scores
from lorag.knowledge.retrieval import Candidate
from lorag.logging import get_logger

if TYPE_CHECKING:
    from lorag.knowledge.service import KnowledgeService

log = get_logger("lorag.knowledge.evaluate")
DEFAULT_DEPTH = 200  # chunks per retriever: enough for recall@100 over documents
ProgressFn = Callable[[int], None]  # called with the number of queries just finished


@dataclass
class QueryRun:
    """One query's raw lists: (chunk id, score) best first, and exact BM25 of vector-only chunks."""

    qid: str
    vector: list[tuple[str, float]]
    keyword: list[tuple[str, float]]
    keyword_extra: dict[str, float] = field(default_factory=dict)


@dataclass
class Runs:
    """Every judged query's lists, and each chunk's document (what the qrels name)."""

    kb: str
    runs: list[QueryRun]
    refs: dict[str, str]
    depth: int

    def ranking(self, run: QueryRun, mode: str, fusion: Fusion | None = None) -> list[str]:
        """Documents best first, each at its best chunk's place."""
        if mode == "vector":
            chunks = [chunk for chunk, _ in run.vector]
        elif mode == "keyword":
            chunks = [chunk for chunk, _ in run.keyword]
        else:
            assert fusion is not None
            chunks = [c.id for c, _ in self.fused(run, fusion)]
        return list(dict.fromkeys(self.refs[chunk] for chunk in chunks if chunk in self.refs))

    def fused(self, run: QueryRun, fusion: Fusion) -> list[tuple[Candidate, float]]:
        vector = [Candidate(self.kb, chunk, "", {}, score) for chunk, score in run.vector]
        keyword = [Candidate(self.kb, chunk, "", {}, score) for chunk, score in run.keyword]
        return fuse(vector, keyword, fusion, run.keyword_extra.get)

    def score(self, qrels: dict[str, dict[str, int]], mode: str, fusion: Fusion | None = None,
              only: set[str] | None = None) -> dict[str, float]:
        """Mean metrics of one mode (or one fusion) over the runs (or the queries in `only`)."""
        chosen = [run for run in self.runs if only is None or run.qid in only]
        rankings = {run.qid: self.ranking(run, mode, fusion) for run in chosen}
        return mean_scores(rankings, {qid: qrels[qid] for qid in rankings})


def document_refs(service: KnowledgeService, kb: str) -> set[str]:
    """What judged sets may call this base's documents (corpus record ids, else sources)."""
    _, manifest = service.store.collections(kb)
    return {document_ref({"source": r.source, "file_type": r.file_type}) for r in Manifest(manifest).all().values()}


def collect(
    service: KnowledgeService,
    kb: str,
    judged: JudgedSet,
    depth: int = DEFAULT_DEPTH,
    progress: ProgressFn | None = None,
    batch: int = 64,
) -> Runs:
    """Run every judged query through both retrievers once."""
    info = service._info(kb)
    service._check_model(info)
    index = service.keyword_index(kb)
    refs: dict[str, str] = {}
    runs: list[QueryRun] = []
    items = list(judged.queries.items())
    for start in range(0, len(items), batch):
        part = items[start : start + batch]
        vectors = service.embedder.encode_queries([text for _, text in part])
        for (qid, text), vector in zip(part, vectors, strict=True):
            lists = service.retrieve_lists(kb, text, depth, "hybrid", None, vector.tolist(), index)
            in_keyword = {c.id for c in lists.keyword}
            extra: dict[str, float] = {}
            for candidate in lists.vector + lists.keyword:
                if candidate.id not in refs:
                    payload = index.payload(candidate.id)
                    refs[candidate.id] = document_ref(payload[1] if payload else candidate.metadata)
                if candidate.id not in in_keyword and lists.keyword_score is not None:
                    extra[candidate.id] = lists.keyword_score(candidate.id) or 0.0
            runs.append(
                QueryRun(
                    qid,
                    [(c.id, c.score) for c in lists.vector],
                    [(c.id, c.score) for c in lists.keyword],
                    extra,
                )
            )
        if progress is not None:
            progress(len(part))
    return Runs(kb, runs, refs, depth)


def reranked_scores(
    service: KnowledgeService, runs: Runs, judged: JudgedSet, fusion: Fusion, progress: ProgressFn | None = None
) -> dict[str, float]:
    """hybrid + rerank: the cross-encoder reorders the first `rerank_candidates` fused chunks."""
    from lorag.knowledge.embeddings import get_reranker

    cfg = service.settings.retrieval
    assert cfg.reranker_model
    reranker = get_reranker(cfg.reranker_model, service.settings.embedding.device)
    index = service.keyword_index(runs.kb)
    rankings: dict[str, list[str]] = {}
    for run in runs.runs:
        fused = [c.id for c, _ in runs.fused(run, fusion)]
        head, tail = fused[: cfg.rerank_candidates], fused[cfg.rerank_candidates :]
        texts = [(index.payload(chunk) or ("", {}))[0] for chunk in head]
        scores = reranker.score(judged.queries[run.qid], texts)
        head = [chunk for chunk, _ in sorted(zip(head, scores, strict=True), key=lambda p: p[1], reverse=True)]
        rankings[run.qid] = list(dict.fromkeys(runs.refs[c] for c in head + tail if c in runs.refs))
        if progress is not None:
            progress(0)
    return mean_scores(rankings, judged.qrels)


def evaluate(
    service: KnowledgeService,
    kb: str,
    judged: JudgedSet,
    *,
    depth: int = DEFAULT_DEPTH,
    modes: Sequence[str] | None = None,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Mean nDCG@10, recall@100 and MRR@10 per mode, as `kb eval --json` prints them."""
    if not 10 <= depth <= 10000:
        raise LoragError("depth must be between 10 and 10000", param="depth")
    started = time.perf_counter()
    fusion = service.fusion_for(service._info(kb))
    wanted = list(modes or ("vector", "keyword", "hybrid"))
    if service.settings.retrieval.reranker_model and modes is None:
        wanted.append("hybrid+rerank")
    runs = collect(service, kb, judged, depth, progress)
    scores: dict[str, dict[str, float]] = {}
    for mode in wanted:
        if mode == "hybrid+rerank":
            if not service.settings.retrieval.reranker_model:
                raise LoragError("hybrid+rerank needs knowledge.retrieval.reranker_model", param="modes")
            scores[mode] = reranked_scores(service, runs, judged, fusion)
        elif mode in ("vector", "keyword", "hybrid"):
            scores[mode] = runs.score(judged.qrels, mode, fusion)
        else:
            raise LoragError(f"unknown mode {mode!r}", param="modes")
    result: dict[str, Any] = {
        "kb": kb,
        "queries": len(judged.queries),
        "judgements": sum(len(j) for j in judged.qrels.values()),
        "depth": depth,
        "fusion": fusion.to_settings(),
        "metrics": list(METRICS),
        "modes": {mode: {m: round(v, 4) for m, v in row.items()} for mode, row in scores.items()},
        "seconds": round(time.perf_counter() - started, 2),
    }
    log.info("kb.eval.done", kb=kb, queries=result["queries"], **{f"{m}_ndcg@10": r["ndcg@10"] for m, r in result["modes"].items()})
    return result
