"""Knowledge-base benchmark (not a test): retrieval quality on judged sets, ingestion throughput,
query latency.

    python benchmarks/retrieval.py                                  # everything
    python benchmarks/retrieval.py --skip-ingest --skip-latency     # quality (and llama-index) only
    python benchmarks/retrieval.py --skip-ingest --skip-latency --llama-quick   # no timing at all
    python benchmarks/retrieval.py --sets scifact --sweep --skip-ingest --skip-latency

1. Quality: the BEIR-layout sets in ../shared/data/retrieval/ (SciFact, Cranfield, CISI;
   skipped with a message when the folder is missing), each ingested with `kb ingest`'s
   corpus reader into a cached base (--cache, one state dir per set; re-runs cost a hash
   pass). nDCG@10, recall@100 and MRR@10 on the test qrels for vector, keyword and hybrid
   (the configured default fusion), documents ranked by their best chunk, beside the
   published anchors (SciFact: all-MiniLM-L6-v2 0.645, BM25 0.665). On SciFact the fusion
   grid (RRF and convex combinations) is also scored on the *train* qrels, which is where
   the default fusion was chosen. Targets: hybrid >= max(vector, keyword) - 0.005 on every
   set; hybrid >= vector + 0.02 on SciFact. Beside them, in the same run (--skip-llama-index
   leaves it out, --llama-quick scores quality only): llama-index's own VectorStoreIndex over
   ChromaVectorStore, BM25Retriever and QueryFusionRetriever in its three modes, built from
   lorag's stored chunks and vectors (nothing re-embedded) with lorag's query embedding;
   nDCG@10 and p50 ms per configuration, 50 chunks per retriever on both sides. Targets:
   hybrid >= llama-index's best fusion on every set, +0.01 on average, at no more latency.
2. Ingestion: chunks/s of `KnowledgeService.ingest_files` (read, split, embed, write to
   Chroma, manifest commits) against the embedding model's raw `encode` of the very same
   chunk texts with the same batch size, in rounds (the first one warms the process up: a
   raw encode right after it would get warm kernels for free). Target: >= 0.90x. Also
   against lorag's own encode of the chunks (batches cut where chunks get shorter, less
   padding than raw encode's fixed batches): that ratio is the pipeline's own cost.
3. Latency: p50/p95 of `KnowledgeService.query` (query embedding + search) per mode at each
   size. The large chunk sets are synthetic: texts drawn from a vocabulary, vectors made
   from real embeddings of a few thousand of them plus noise (embedding 100k chunks on
   2 cores would take over an hour and measure nothing new). Target: hybrid p50 <= 15 ms
   at 100k. The query embedding is also timed in float32 and, as the baseline, in float32
   through sentence-transformers' own modules (what lorag ran before query_model.py), beside
   the configured one (knowledge.embedding.query_precision; --query-precision float32 runs
   everything in float32, which is how the quality cost of bfloat16 queries is measured).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lorag.config import load_settings  # noqa: E402
from lorag.knowledge.corpus import document_ref, expand_corpora  # noqa: E402
from lorag.knowledge.embeddings import get_embedder  # noqa: E402
from lorag.knowledge.evaluate import QueryRun, Runs, collect, document_refs  # noqa: E402
from lorag.knowledge.fusion import Fusion  # noqa: E402
from lorag.knowledge.judged import JudgedSet, load_files  # noqa: E402
from lorag.knowledge.manifest import DocRecord, Manifest, chunk_id_for, doc_id_for  # noqa: E402
from lorag.knowledge.metrics import mean_scores  # noqa: E402
from lorag.knowledge.service import KnowledgeService  # noqa: E402
from lorag.knowledge.source_files import SourceFile, collect_paths  # noqa: E402

WORDS = ["river", "mountain", "copper", "violin", "orbit", "harbor", "lantern", "meadow", "signal", "glacier", "quartz", "falcon", "cinnamon", "turbine", "archive", "compass", "velvet", "thunder", "saffron", "ledger", "canyon", "beacon", "protein", "enzyme", "membrane", "receptor", "neuron", "cortex", "tumor", "vaccine", "antibody", "genome", "mutation", "insulin", "kidney", "liver", "plasma", "lattice", "photon", "quantum", "magnet", "crystal", "polymer", "catalyst", "reactor", "voltage", "circuit", "sensor", "robot", "market", "invoice", "contract", "tariff", "budget", "pension", "mortgage", "dividend", "auditor", "revenue", "subsidy"]


def sentence(rng: random.Random, n: int = 12) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[index]


# Settings every service of a run gets (dotted keys, e.g. from --query-precision).
OVERRIDES: dict[str, Any] = {}


def open_service(state: Path) -> KnowledgeService:
    config = state / "bench.toml"
    state.mkdir(parents=True, exist_ok=True)
    config.write_text("", encoding="utf-8")
    values = {"state_dir": str(state), **OVERRIDES}
    return KnowledgeService.from_settings(load_settings(config, values))


# ---------------------------------------------------------------------------- 1. ingestion


def bench_ingestion(service: KnowledgeService, documents: int) -> dict[str, Any]:
    rng = random.Random(1)
    files = []
    for i in range(documents):
        paragraphs = ["\n".join(sentence(rng, 14) for _ in range(6)) for _ in range(4)]
        files.append(SourceFile(source=f"bench/doc{i:05d}.md", name=f"doc{i:05d}.md", data="\n\n".join(paragraphs).encode(), origin="record"))
    service.create("bench-ingest")
    embedder = service.embedder
    # Warm-up (imports, first splitter, first Chroma write) is not throughput: one small document.
    warm = SourceFile(source="bench/warm-up.md", name="warm-up.md", data=b"# Warm up\n\nA short warm-up document.", origin="record")
    service.ingest_files("bench-ingest", [warm])
    start = time.perf_counter()
    report = service.ingest_files("bench-ingest", files)
    ingest_s = time.perf_counter() - start
    chunks, _ = service.store.collections("bench-ingest")
    texts = chunks.get(where={"source": {"$ne": warm.source}}, include=["documents"])["documents"]
    # The baseline, raw `encode` (sentence-transformers' fixed batches over all chunks at once),
    # and lorag's own encode of the same chunks (its length-cut batches, see length_batches):
    # ingestion against the second is the pipeline's own cost. Each runs twice, interleaved,
    # and is averaged: a shared 2-core machine drifts over a minute.
    def raw(texts: list[str]) -> None:
        embedder.model.encode(texts, batch_size=embedder.settings.batch_size, show_progress_bar=False, normalize_embeddings=True)

    spent: dict[Callable[[list[str]], object], float] = {raw: 0.0, embedder.encode_documents: 0.0}
    for _ in range(2):
        for encode in spent:
            start = time.perf_counter()
            encode(texts)
            spent[encode] += (time.perf_counter() - start) / 2
    raw_s, own_s = spent.values()
    tokens = [len(embedder.count_tokens(t)) for t in texts]
    result = {
        "documents": documents,
        "chunks": report.chunks_written,
        "mean_tokens_per_chunk": round(statistics.mean(tokens), 1),
        "ingest_s": round(ingest_s, 2),
        "ingest_chunks_per_s": round(report.chunks_written / ingest_s, 2),
        "raw_encode_s": round(raw_s, 2),
        "raw_encode_chunks_per_s": round(len(texts) / raw_s, 2),
        "ratio": round((report.chunks_written / ingest_s) / (len(texts) / raw_s), 3),
        "own_encode_s": round(own_s, 2),
        "ratio_to_own_encode": round((report.chunks_written / ingest_s) / (len(texts) / own_s), 3),
    }
    service.drop("bench-ingest")
    return result


# ---------------------------------------------------------------------------- 2. latency


def build_synthetic(service: KnowledgeService, kb: str, size: int, base_vectors: np.ndarray, base_texts: list[str]) -> float:
    """`size` chunks written straight into the collections (the format ingestion writes)."""
    rng = np.random.default_rng(size)
    text_rng = random.Random(size)
    service.create(kb)
    chunks, manifest_collection = service.store.collections(kb)
    manifest = Manifest(manifest_collection)
    per_doc = 10
    start = time.perf_counter()
    batch = 5000
    for offset in range(0, size, batch):
        count = min(batch, size - offset)
        picks = rng.integers(0, len(base_vectors), count)
        vectors = base_vectors[picks] + rng.normal(0, 0.35 / math.sqrt(base_vectors.shape[1]), (count, base_vectors.shape[1]))
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        ids, texts, metas = [], [], []
        records: dict[str, DocRecord] = {}
        for n in range(count):
            index = offset + n
            doc = index // per_doc
            source = f"synthetic/doc{doc:06d}.txt"
            doc_id = doc_id_for(source)
            content_hash = f"{doc:064x}"
            ids.append(chunk_id_for(doc_id, content_hash, index % per_doc))
            texts.append(base_texts[picks[n]] + " " + sentence(text_rng, 20))
            metas.append({
                "source": source, "doc_id": doc_id, "title": f"Doc {doc}", "file_type": "text", "origin": "record",
                "content_hash": content_hash, "chunk_index": index % per_doc, "ingested_at": "2026-01-01T00:00:00+00:00",
                "location": "", "page": 1 + (index % per_doc) // 3,
            })
            records[doc_id] = DocRecord(doc_id=doc_id, source=source, content_hash=content_hash, n_chunks=per_doc, bytes=1000, title=f"Doc {doc}", file_type="text", origin="record")
        for start_at in range(0, count, 1000):
            chunks.upsert(
                ids=ids[start_at : start_at + 1000],
                embeddings=vectors[start_at : start_at + 1000].astype(np.float32),
                documents=texts[start_at : start_at + 1000],
                metadatas=metas[start_at : start_at + 1000],
            )
        manifest.put(records.values())
    service._changed(kb)  # as ingestion does: bump the revision
    return time.perf_counter() - start


def wait_for_quiet(max_load: float | None, max_wait_s: float) -> None:
    """On a shared machine, start timing only once the 1-minute load average has dropped."""
    if max_load is None:
        return
    deadline = time.time() + max_wait_s
    while os.getloadavg()[0] > max_load and time.time() < deadline:
        time.sleep(5)


def bench_latency(
    service: KnowledgeService, sizes: list[int], queries: int, quiet: tuple[float | None, float] = (None, 0)
) -> list[dict[str, Any]]:
    rng = random.Random(7)
    base_texts = [" ".join(sentence(rng, 10) for _ in range(2)) for _ in range(2000)]
    start = time.perf_counter()
    base_vectors = service.embedder.encode_documents(base_texts)
    print(f"  embedded {len(base_texts)} base texts in {time.perf_counter() - start:.1f} s", flush=True)
    query_texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8))) for _ in range(queries)]
    float32 = get_embedder(service.settings.embedding.model_copy(update={"query_precision": "float32"}))
    for text in query_texts[:10]:
        service.embedder.encode_query(text), float32.encode_query(text)  # warm both
    results = []
    for size in sizes:
        kb = f"bench-{size}"
        if service.exists(kb):
            service.drop(kb)
        build_s = build_synthetic(service, kb, size, base_vectors, base_texts)
        chunks, _ = service.store.collections(kb)
        start = time.perf_counter()
        service.keyword_index(kb)
        bm25_s = time.perf_counter() - start
        row: dict[str, Any] = {"chunks": chunks.count(), "build_s": round(build_s, 1), "bm25_build_s": round(bm25_s, 1)}
        wait_for_quiet(*quiet)
        row["load_avg_before"] = round(os.getloadavg()[0], 2)
        # The configured query model against float32 (traced) and the baseline, float32 through
        # sentence-transformers' modules (eager), interleaved so that host drift hits all alike.
        def eager(text: str) -> None:
            float32.query_model().eager_embedding(float32._query_features(text))

        timed = {"configured": service.embedder.encode_query, "float32": float32.encode_query, "eager_float32": eager}
        embed_ms: dict[str, list[float]] = {label: [] for label in timed}
        for text in query_texts[:100]:
            for label, encode in timed.items():
                t = time.perf_counter()
                encode(text)
                embed_ms[label].append((time.perf_counter() - t) * 1000)
        p50 = {label: percentile(times, 50) for label, times in embed_ms.items()}
        row["query_embedding"] = {
            "dtype": service.embedder.query_dtype(),
            "traced": service.embedder.query_model().traced is not None,
            "p50_ms": round(p50["configured"], 2),
            "float32_p50_ms": round(p50["float32"], 2),
            "eager_float32_p50_ms": round(p50["eager_float32"], 2),
            "speedup_vs_eager_float32": round(p50["eager_float32"] / p50["configured"], 2),
        }
        for mode in ("vector", "keyword", "hybrid"):
            for text in query_texts[:10]:
                service.query(kb, text, top_k=10, mode=mode)  # warm-up
            times = []
            for text in query_texts:
                t = time.perf_counter()
                service.query(kb, text, top_k=10, mode=mode)
                times.append((time.perf_counter() - t) * 1000)
            row[mode] = {"p50_ms": round(percentile(times, 50), 2), "p95_ms": round(percentile(times, 95), 2)}
        filtered = []
        for text in query_texts:
            t = time.perf_counter()
            service.query(kb, text, top_k=10, mode="hybrid", filters={"page": 2})
            filtered.append((time.perf_counter() - t) * 1000)
        row["hybrid_filtered"] = {"p50_ms": round(percentile(filtered, 50), 2), "p95_ms": round(percentile(filtered, 95), 2)}
        row["load_avg_after"] = round(os.getloadavg()[0], 2)
        print(f"  {json.dumps(row)}", flush=True)
        results.append(row)
        service.drop(kb)
    return results


# ---------------------------------------------------------------------------- 3. quality

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "retrieval"
SETS = ("scifact", "cranfield", "cisi")
# Published nDCG@10 on BEIR SciFact (the README of the data folder: MTEB and BEIR).
ANCHORS = {"scifact": {"vector": (0.645, "all-MiniLM-L6-v2, MTEB"), "keyword": (0.665, "BM25, BEIR")}}


def fusion_grid() -> list[Fusion]:
    """Every fusion measured: RRF (k, weights) and convex combinations under three normalisations."""
    grid = [
        Fusion(method="rrf", rrf_k=k).with_alpha(alpha) for k in (10, 20, 40, 60, 100) for alpha in (0.3, 0.4, 0.5, 0.6, 0.7)
    ]
    grid += [
        Fusion(method="convex", norm=norm).with_alpha(round(0.05 * i, 2))
        for norm in ("minmax", "zscore", "tmm")
        for i in range(1, 20)
    ]
    return grid


def ingest_set(service: KnowledgeService, name: str, directory: Path, as_ingested: bool) -> dict[str, Any]:
    """The set's corpus as `lorag kb ingest` reads it (incremental: a cached base costs a hash
    pass); `as_ingested` scores a cached base as it is (e.g. a partly ingested one)."""
    if not service.exists(name):
        service.create(name)
    collected = expand_corpora(collect_paths([str(directory / "corpus.jsonl")]))
    start = time.perf_counter()
    written = 0
    if not as_ingested:
        written = service.ingest_files(name, collected.files, skipped=collected.skipped).chunks_written
    chunks, manifest = service.store.collections(name)
    return {
        "corpus_documents": len(collected.files),
        "documents": int(manifest.count()),
        "chunks": int(chunks.count()),
        "chunks_written_now": written,
        "ingest_s": round(time.perf_counter() - start, 1),
    }


def bench_set(
    service: KnowledgeService, name: str, directory: Path, depth: int, sweep: bool, as_ingested: bool,
    llama: str = "off", llama_dir: Path | None = None,
) -> dict[str, Any]:
    """Per mode nDCG@10 / recall@100 / MRR@10 on the test qrels, and every fusion of the grid."""
    result: dict[str, Any] = ingest_set(service, name, directory, as_ingested)
    documents = document_refs(service, name)
    judged = load_files(directory / "queries.jsonl", directory / "qrels" / "test.tsv",
                        documents=documents, allow_unknown_documents=True)
    start = time.perf_counter()
    runs = collect(service, name, judged, depth)
    result.update({"queries": len(judged.queries), "collect_s": round(time.perf_counter() - start, 1)})
    default = service.fusion_for(service._info(name))
    result["fusion"] = default.describe()
    for mode in ("vector", "keyword", "hybrid"):
        result[mode] = {m: round(v, 4) for m, v in runs.score(judged.qrels, mode, default).items()}
    # What a query fuses (knowledge.retrieval.candidates per retriever), top 10 only.
    width = service.settings.retrieval.candidates
    result["hybrid_at_candidates"] = {
        "candidates": width,
        "ndcg@10": round(truncated(runs, width).score(judged.qrels, "hybrid", default)["ndcg@10"], 4),
    }
    if llama != "off":
        assert llama_dir is not None
        result["llama_index"] = compare_set(service, name, judged, runs, llama_dir, width, llama == "quick")
    if sweep:
        result["sweep"] = {f.describe(): round(runs.score(judged.qrels, "hybrid", f)["ndcg@10"], 4) for f in fusion_grid()}
    if name == "scifact" and (directory / "qrels" / "train.tsv").exists():
        train = load_files(directory / "queries.jsonl", directory / "qrels" / "train.tsv",
                           documents=documents, allow_unknown_documents=True)
        train_runs = collect(service, name, train, depth)
        scores = {f.describe(): (train_runs.score(train.qrels, "hybrid", f)["ndcg@10"], f) for f in fusion_grid()}
        ranked = sorted(scores.items(), key=lambda item: item[1][0], reverse=True)
        result["train"] = {
            "queries": len(train.queries),
            "vector": round(train_runs.score(train.qrels, "vector")["ndcg@10"], 4),
            "keyword": round(train_runs.score(train.qrels, "keyword")["ndcg@10"], 4),
            "best": [(label, round(score, 4)) for label, (score, _) in ranked[:8]],
            "best_rrf": next((label, round(score, 4)) for label, (score, f) in ranked if f.method == "rrf"),
            "best_per_norm": {
                norm: next((label, round(score, 4)) for label, (score, f) in ranked if f.method == "convex" and f.norm == norm)
                for norm in ("minmax", "zscore", "tmm")
            },
            "default": round(train_runs.score(train.qrels, "hybrid", default)["ndcg@10"], 4),
        }
    return result


def truncated(runs: Runs, width: int) -> Runs:
    """The same runs with each list cut to `width` (BM25 of the dropped chunks stays known)."""
    cut = [
        QueryRun(r.qid, r.vector[:width], r.keyword[:width], {**r.keyword_extra, **dict(r.keyword[width:])})
        for r in runs.runs
    ]
    return Runs(runs.kb, cut, runs.refs, width)


def print_set(name: str, row: dict[str, Any]) -> None:
    print(f"\n{name}: {row['documents']} of {row['corpus_documents']} documents, {row['chunks']} chunks, "
          f"{row['queries']} judged test queries; "
          f"hybrid = {row['fusion']}")
    print(f"  {'mode':<9}{'nDCG@10':>9}{'recall@100':>12}{'MRR@10':>9}   published nDCG@10")
    for mode in ("vector", "keyword", "hybrid"):
        anchor = ANCHORS.get(name, {}).get(mode)
        note = f"   {anchor[0]:.3f} ({anchor[1]})" if anchor else ""
        r = row[mode]
        print(f"  {mode:<9}{r['ndcg@10']:>9.4f}{r['recall@100']:>12.4f}{r['mrr@10']:>9.4f}{note}")
    at = row["hybrid_at_candidates"]
    print(f"  hybrid fusing {at['candidates']} candidates per retriever (as queries do): nDCG@10 {at['ndcg@10']:.4f}")
    best = max(row["vector"]["ndcg@10"], row["keyword"]["ndcg@10"])
    hybrid = row["hybrid"]["ndcg@10"]
    print(f"  target hybrid >= max(vector, keyword) - 0.005: {hybrid:.4f} vs {best - 0.005:.4f} "
          f"{'ok' if hybrid >= best - 0.005 else 'MISSED'}")
    if name == "scifact":
        vector = row["vector"]["ndcg@10"]
        print(f"  target hybrid >= vector + 0.02: {hybrid:.4f} vs {vector + 0.02:.4f} {'ok' if hybrid >= vector + 0.02 else 'MISSED'}")
    if "train" in row:
        train = row["train"]
        print(f"  fusion chosen on SciFact train ({train['queries']} queries; vector {train['vector']:.4f}, "
              f"keyword {train['keyword']:.4f}; configured default scores {train['default']:.4f}):")
        for label, score in train["best"]:
            print(f"    {score:.4f}  {label}")
        print(f"    best rrf: {train['best_rrf'][1]:.4f}  {train['best_rrf'][0]}")
        for norm, (label, score) in train["best_per_norm"].items():
            print(f"    best convex {norm}: {score:.4f}  {label}")
    if "sweep" in row:
        print("  hybrid nDCG@10 per fusion on the test queries:")
        families: dict[str, list[str]] = {}
        for label, score in row["sweep"].items():
            family, _, knob = label.partition(" (")
            if family == "rrf":
                k, _, weights = knob.rstrip(")").partition(", weights ")
                family, knob = f"rrf {k}", f"w {weights}"
            else:
                knob = "a=" + knob.rstrip(")").removeprefix("vector weight ")
            families.setdefault(family, []).append(f"{knob} {score:.4f}")
        for family, cells in families.items():
            print(f"    {family:<15} " + "  ".join(cells))


def bench_quality(
    base_state: Path, data: Path, sets: list[str], depth: int, sweep: bool, as_ingested: bool = False,
    llama: str = "off",
) -> dict[str, Any]:
    """Every set's figures; with `llama` ("full": timed, "quick": quality only) also
    llama-index's retrievers over the same chunks, and their average over the sets."""
    results: dict[str, Any] = {}
    for name in sets:
        directory = data / name
        if not (directory / "corpus.jsonl").exists():
            print(f"  {name}: no {directory}/corpus.jsonl, skipped", flush=True)
            continue
        service = open_service(base_state / name)
        try:
            results[name] = bench_set(service, name, directory, depth, sweep, as_ingested,
                                      llama, base_state / name / "llama-index")
        finally:
            service.close()
        print_set(name, results[name])
        if "llama_index" in results[name]:
            print_comparison(name, results[name]["llama_index"])
    compared = {name: row["llama_index"] for name, row in results.items() if "llama_index" in row}
    if compared:
        results["llama_index_average"] = comparison_average(compared)
        print_average(results["llama_index_average"])
    return results


# ---------------------------------------------------------------------------- 4. llama-index baseline

# QueryFusionRetriever's modes, each over llama-index's own vector and BM25 retrievers.
LLAMA_FUSIONS = ("reciprocal_rerank", "relative_score", "dist_based_score")
LORAG_MODES = ("vector", "keyword", "hybrid")
COMPARED = (*(f"lorag {m}" for m in LORAG_MODES), "llama vector", "llama bm25", *(f"llama {m}" for m in LLAMA_FUSIONS))
_PAGE = 5000


def llama_embedding(embedder: Any) -> Any:
    """A llama-index BaseEmbedding over lorag's embedder, so that llama-index's query path runs
    the very model, precision and code lorag's does (latency compares retrieval, not models):
    lorag.knowledge.llama_embedding's where there is one, else a minimal one here."""
    try:
        from lorag.knowledge.llama_embedding import LoragEmbedding as Shipped

        return Shipped(embedder=embedder)
    except ImportError:
        pass
    from llama_index.core.embeddings import BaseEmbedding
    from pydantic import PrivateAttr

    class LoragEmbedding(BaseEmbedding):  # type: ignore[misc]
        _embedder: Any = PrivateAttr()

        def __init__(self, embedder: Any) -> None:
            super().__init__(model_name=embedder.name)
            self._embedder = embedder

        def _get_query_embedding(self, query: str) -> list[float]:
            return [float(x) for x in self._embedder.encode_query(query)]

        async def _aget_query_embedding(self, query: str) -> list[float]:
            return self._get_query_embedding(query)

        def _get_text_embedding(self, text: str) -> list[float]:
            return [float(x) for x in self._embedder.encode_documents([text])[0]]

    return LoragEmbedding(embedder)


def stored_chunks(service: KnowledgeService, kb: str) -> tuple[list[str], list[str], np.ndarray]:
    """lorag's own chunks of a base: ids, texts and stored vectors (nothing is embedded again)."""
    chunks, _ = service.store.collections(kb)
    ids: list[str] = []
    texts: list[str] = []
    vectors: list[np.ndarray] = []
    for offset in range(0, int(chunks.count()), _PAGE):
        page = chunks.get(include=["documents", "embeddings"], limit=_PAGE, offset=offset)
        ids += page["ids"]
        texts += [d or "" for d in page["documents"]]
        vectors.append(np.asarray(page["embeddings"], dtype=np.float32))
    return ids, texts, np.concatenate(vectors) if vectors else np.zeros((0, 0), dtype=np.float32)


def llama_nodes(ids: list[str], texts: list[str], vectors: np.ndarray) -> list[Any]:
    """TextNodes of lorag's chunks; the chunk id is metadata hidden from BM25 and the embedding,
    only so that two chunks of equal text keep apart in QueryFusionRetriever (it merges by hash)."""
    from llama_index.core.schema import TextNode

    return [
        TextNode(id_=cid, text=text, embedding=vector.tolist(), metadata={"chunk": cid},
                 excluded_embed_metadata_keys=["chunk"], excluded_llm_metadata_keys=["chunk"])
        for cid, text, vector in zip(ids, texts, vectors, strict=True)
    ]


def llama_vector_index(nodes: list[Any], directory: Path, name: str, embed: Any) -> Any:
    """VectorStoreIndex over a ChromaVectorStore (Chroma's defaults, as llama-index's guide
    makes one), kept in `directory` and rebuilt only when lorag's chunks changed."""
    import hashlib

    import chromadb
    from chromadb.config import Settings as ChromaClientSettings
    from llama_index.core import StorageContext, VectorStoreIndex
    from llama_index.vector_stores.chroma import ChromaVectorStore

    digest = hashlib.sha256("\n".join(sorted(n.node_id for n in nodes)).encode()).hexdigest()[:16]
    client = chromadb.PersistentClient(path=str(directory), settings=ChromaClientSettings(anonymized_telemetry=False))
    collection = client.get_or_create_collection(name)
    if (collection.metadata or {}).get("chunks") == digest and collection.count() == len(nodes):
        return VectorStoreIndex.from_vector_store(ChromaVectorStore(chroma_collection=collection), embed_model=embed)
    client.delete_collection(name)
    collection = client.create_collection(name, metadata={"chunks": digest})
    store = ChromaVectorStore(chroma_collection=collection)
    return VectorStoreIndex(nodes, storage_context=StorageContext.from_defaults(vector_store=store), embed_model=embed)


def llama_retrievers(service: KnowledgeService, kb: str, directory: Path, depth: int) -> dict[str, Any]:
    """llama-index's stock retrievers over lorag's chunks: vector, BM25 and QueryFusionRetriever
    in each mode (one query, no LLM: num_queries=1; sync, its quickest path)."""
    from llama_index.core.llms import MockLLM
    from llama_index.core.retrievers import QueryFusionRetriever
    from llama_index.retrievers.bm25 import BM25Retriever

    nodes = llama_nodes(*stored_chunks(service, kb))
    index = llama_vector_index(nodes, directory, kb, llama_embedding(service.embedder))
    vector = index.as_retriever(similarity_top_k=depth)
    bm25 = BM25Retriever.from_defaults(nodes=nodes, similarity_top_k=depth)
    found: dict[str, Any] = {"llama vector": vector, "llama bm25": bm25}
    for mode in LLAMA_FUSIONS:
        found[f"llama {mode}"] = QueryFusionRetriever(
            [vector, bm25], llm=MockLLM(), mode=mode, similarity_top_k=depth, num_queries=1, use_async=False
        )
    return found


def llama_fused(fusion: Any, lists: tuple[list[Any], list[Any]]) -> list[Any]:
    """QueryFusionRetriever's own fusion of given lists (what its retrieve would return)."""
    from llama_index.core.schema import NodeWithScore

    results = {("q", i): [NodeWithScore(node=n.node, score=n.score) for n in nodes] for i, nodes in enumerate(lists)}
    if fusion.mode == "reciprocal_rerank":
        fused: list[Any] = fusion._reciprocal_rerank_fusion(results)
    else:
        fused = fusion._relative_score_fusion(results, dist_based=fusion.mode == "dist_based_score")
    return fused[: fusion.similarity_top_k]


def compare_callers(service: KnowledgeService, kb: str, llama: dict[str, Any], depth: int) -> dict[str, Callable[[str], list[str]]]:
    """Each configuration as one call: a query in, chunk ids best first out (what gets timed)."""
    def lorag(mode: str) -> Callable[[str], list[str]]:
        return lambda text: [hit.chunk_id for hit in service.query(kb, text, top_k=depth, mode=mode)]

    def llama_call(retriever: Any) -> Callable[[str], list[str]]:
        return lambda text: [n.node.node_id for n in retriever.retrieve(text)]

    callers = {f"lorag {m}": lorag(m) for m in LORAG_MODES}
    callers.update({label: llama_call(retriever) for label, retriever in llama.items()})
    return callers


def timed_runs(callers: dict[str, Callable[[str], list[str]]], queries: list[tuple[str, str]],
               warm: int = 10) -> tuple[dict[str, dict[str, list[str]]], dict[str, list[float]]]:
    """Every configuration on every query, interleaved (the first one rotating) so that a shared
    machine's drift hits all alike; the first `warm` queries run once untimed first."""
    labels = list(callers)
    for _, text in queries[:warm]:
        for label in labels:
            callers[label](text)
    chunks: dict[str, dict[str, list[str]]] = {label: {} for label in labels}
    times: dict[str, list[float]] = {label: [] for label in labels}
    for n, (qid, text) in enumerate(queries):
        for label in labels[n % len(labels):] + labels[: n % len(labels)]:
            start = time.perf_counter()
            chunks[label][qid] = callers[label](text)
            times[label].append((time.perf_counter() - start) * 1000)
    return chunks, times


def quick_runs(runs: Runs, llama: dict[str, Any], queries: list[tuple[str, str]], depth: int) -> dict[str, dict[str, list[str]]]:
    """Quality only: lorag's modes from its evaluation lists (cut to `depth`), llama-index's two
    retrievers once per query and its three fusions applied to those very lists."""
    cut = truncated(runs, depth)
    default = Fusion.from_settings_dict({})
    chunks: dict[str, dict[str, list[str]]] = {label: {} for label in COMPARED}
    for run in cut.runs:
        chunks["lorag vector"][run.qid] = [c for c, _ in run.vector]
        chunks["lorag keyword"][run.qid] = [c for c, _ in run.keyword]
        chunks["lorag hybrid"][run.qid] = [c.id for c, _ in cut.fused(run, default)][:depth]
    for qid, text in queries:
        lists = (llama["llama vector"].retrieve(text), llama["llama bm25"].retrieve(text))
        chunks["llama vector"][qid] = [n.node.node_id for n in lists[0]]
        chunks["llama bm25"][qid] = [n.node.node_id for n in lists[1]]
        for mode in LLAMA_FUSIONS:
            chunks[f"llama {mode}"][qid] = [n.node.node_id for n in llama_fused(llama[f"llama {mode}"], lists)]
    return chunks


def chunk_refs(service: KnowledgeService, kb: str) -> dict[str, str]:
    """Each chunk's document as the qrels name it (a document ranks at its best chunk)."""
    index = service.keyword_index(kb)
    return {cid: document_ref(meta) for cid, meta in zip(index.ids, index.metadatas, strict=True)}


def compare_set(service: KnowledgeService, name: str, judged: JudgedSet, runs: Runs, directory: Path,
                depth: int, quick: bool) -> dict[str, Any]:
    """nDCG@10 (and p50 ms unless quick) of lorag's three modes and llama-index's five configurations."""
    llama = llama_retrievers(service, name, directory, depth)
    queries = list(judged.queries.items())
    if quick:
        chunks, times = quick_runs(runs, llama, queries, depth), {}
    else:
        chunks, times = timed_runs(compare_callers(service, name, llama, depth), queries)
    refs = chunk_refs(service, name)
    row: dict[str, Any] = {"depth": depth, "quick": quick}
    for label in COMPARED:
        rankings = {qid: list(dict.fromkeys(refs[c] for c in ids if c in refs)) for qid, ids in chunks[label].items()}
        cell = {"ndcg@10": round(mean_scores(rankings, judged.qrels)["ndcg@10"], 4)}
        if label in times:
            cell["p50_ms"] = round(statistics.median(times[label]), 2)
        row[label] = cell
    return row


def print_comparison(name: str, row: dict[str, Any]) -> None:
    timed = not row["quick"]
    print(f"  lorag vs llama-index ({row['depth']} chunks per retriever, documents at their best chunk"
          f"{'' if timed else ', quality only'}):")
    print(f"    {'configuration':<28}{'nDCG@10':>9}{'p50 ms':>9}" if timed else f"    {'configuration':<28}{'nDCG@10':>9}")
    for label in COMPARED:
        cell = row[label]
        print(f"    {label:<28}{cell['ndcg@10']:>9.4f}" + (f"{cell['p50_ms']:>9.2f}" if timed else ""))
    for line in goal_lines(row):
        print(f"    {line}")


def best_llama_fusion(row: dict[str, Any]) -> str:
    return max((f"llama {m}" for m in LLAMA_FUSIONS), key=lambda label: row[label]["ndcg@10"])


def goal_lines(row: dict[str, Any]) -> list[str]:
    """The issue's targets for one set: hybrid >= llama-index's best fusion (at no more latency)
    and >= its own better part."""
    hybrid = row["lorag hybrid"]["ndcg@10"]
    best = best_llama_fusion(row)
    parts = max(row["lorag vector"]["ndcg@10"], row["lorag keyword"]["ndcg@10"])
    lines = [f"hybrid >= best llama-index fusion ({best}): {hybrid:.4f} vs {row[best]['ndcg@10']:.4f} "
             f"{'ok' if hybrid >= row[best]['ndcg@10'] else 'MISSED'}",
             f"hybrid >= max(vector, keyword): {hybrid:.4f} vs {parts:.4f} {'ok' if hybrid >= parts else 'MISSED'}"]
    if "p50_ms" in row[best]:
        ms, theirs = row["lorag hybrid"]["p50_ms"], row[best]["p50_ms"]
        lines.append(f"hybrid p50 <= {best} p50: {ms:.2f} vs {theirs:.2f} ms {'ok' if ms <= theirs else 'MISSED'}")
    return lines


def comparison_average(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The mean over sets of each configuration's nDCG@10 (and of its p50 ms)."""
    average: dict[str, Any] = {"sets": list(rows)}
    for label in COMPARED:
        cells = [row[label] for row in rows.values()]
        average[label] = {key: round(statistics.mean(c[key] for c in cells), 4) for key in cells[0]}
    return average


def print_average(average: dict[str, Any]) -> None:
    timed = "p50_ms" in average["lorag hybrid"]
    print(f"\naverage over {', '.join(average['sets'])}:")
    for label in COMPARED:
        cell = average[label]
        print(f"    {label:<28}{cell['ndcg@10']:>9.4f}" + (f"{cell['p50_ms']:>9.2f}" if timed else ""))
    best = max((f"llama {m}" for m in LLAMA_FUSIONS), key=lambda label: average[label]["ndcg@10"])
    margin = average["lorag hybrid"]["ndcg@10"] - average[best]["ndcg@10"]
    print(f"    hybrid - best llama-index fusion on average ({best}): {margin:+.4f} (target >= +0.01) "
          f"{'ok' if margin >= 0.01 - 1e-9 else 'MISSED'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000", help="Chunk counts for the latency runs.")
    parser.add_argument("--queries", type=int, default=200, help="Queries per mode and size.")
    parser.add_argument("--ingest-docs", type=int, default=120, help="Documents for the ingestion run.")
    parser.add_argument("--ingest-rounds", type=int, default=3,
                        help="Ingestion runs; the first warms up torch's kernels, which the raw encode after it "
                             "would otherwise get for free.")
    parser.add_argument("--data", type=Path, default=DATA, help="Folder of the judged sets (BEIR layout).")
    parser.add_argument("--sets", default=",".join(SETS), help="Judged sets to score (comma-separated).")
    parser.add_argument(
        "--cache", type=Path, default=Path("/tmp/retrieval-cache"),
        help="Where the judged sets' knowledge bases are kept between runs (one state dir per set).",
    )
    parser.add_argument("--state", type=Path, default=None, help="State directory for ingestion/latency (default: a temporary one).")
    parser.add_argument("--depth", type=int, default=200, help="Judged sets: chunks per retriever and query.")
    parser.add_argument("--sweep", action="store_true", help="Judged sets: also print hybrid nDCG@10 of every fusion measured.")
    parser.add_argument(
        "--as-ingested", action="store_true",
        help="Judged sets: score the cached bases as they are, without ingesting the rest of the corpus.",
    )
    parser.add_argument(
        "--skip-llama-index", action="store_true",
        help="Judged sets: do not run llama-index's retrievers (vector, BM25, QueryFusionRetriever) beside lorag's.",
    )
    parser.add_argument(
        "--llama-quick", action="store_true",
        help="Judged sets: compare with llama-index on quality only (each retriever once per query, its "
             "fusions applied to those lists; no latency).",
    )
    parser.add_argument("--skip-ingest", action="store_true")
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--json", type=Path, default=None, help="Also write the results here.")
    parser.add_argument(
        "--query-precision", choices=("auto", "float32", "bfloat16"), default=None,
        help="knowledge.embedding.query_precision for every run (default: the configured one, auto).",
    )
    parser.add_argument("--quiet-load", type=float, default=None, help="Wait for a 1-min load average below this before timing queries.")
    parser.add_argument("--quiet-wait", type=float, default=900, help="... but no longer than this many seconds.")
    args = parser.parse_args()
    if args.query_precision:
        OVERRIDES["knowledge.embedding.query_precision"] = args.query_precision
    os.environ.setdefault("LORAG_LOG_LEVEL", "warning")
    from lorag.logging import configure_logging

    configure_logging(level=os.environ["LORAG_LOG_LEVEL"])
    import torch

    # Other work on a shared machine skews every figure: the load average says how much.
    results: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_avg_start": [round(x, 2) for x in os.getloadavg()],
    }
    if not args.skip_quality:
        if args.data.is_dir():
            print(f"retrieval quality on {args.data} ...", flush=True)
            sets = [s for s in args.sets.split(",") if s]
            llama = "off" if args.skip_llama_index else ("quick" if args.llama_quick else "full")
            results["quality"] = bench_quality(args.cache, args.data, sets, args.depth, args.sweep, args.as_ingested, llama)
        else:
            print(f"retrieval quality: {args.data} is missing, skipped (the judged sets live in ../shared/data/retrieval/)", flush=True)
    with tempfile.TemporaryDirectory(prefix="lorag-bench-") as tmp:
        service = open_service(args.state or Path(tmp))
        try:
            if not args.skip_ingest:
                print("ingestion throughput ...", flush=True)
                wait_for_quiet(args.quiet_load, args.quiet_wait)
                rounds = []
                for _ in range(args.ingest_rounds):
                    rounds.append(bench_ingestion(service, args.ingest_docs))
                    print(f"  {json.dumps(rounds[-1])}", flush=True)
                steady = rounds[1:] or rounds
                results["ingestion"] = {
                    "rounds": rounds,
                    "ratio": statistics.median(r["ratio"] for r in steady),
                    "ratio_to_own_encode": statistics.median(r["ratio_to_own_encode"] for r in steady),
                }
                print(f"  ingestion / raw encode, median of rounds 2+ (round 1 warms the process up): "
                      f"{results['ingestion']['ratio']:.3f} (target >= 0.90); "
                      f"/ lorag's own encode of the same chunks: {results['ingestion']['ratio_to_own_encode']:.3f}",
                      flush=True)
            if not args.skip_latency:
                print("query latency ...", flush=True)
                sizes = [int(s) for s in args.sizes.split(",") if s]
                results["latency"] = bench_latency(service, sizes, args.queries, (args.quiet_load, args.quiet_wait))
        finally:
            service.close()
    results["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
