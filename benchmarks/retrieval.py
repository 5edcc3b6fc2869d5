"""Knowledge-base benchmark (not a test): ingestion throughput, query latency, retrieval quality.

    python benchmarks/retrieval.py                       # ingestion + latency at 10k and 100k chunks
    python benchmarks/retrieval.py --sizes 10000         # latency at 10k only
    python benchmarks/retrieval.py --scifact /work/scifact --skip-latency --skip-ingest
    python benchmarks/retrieval.py --scifact /work/scifact --skip-latency --skip-ingest \
        --fusion rrf_k=20 --fusion keyword_weight=0.5,rrf_k=10   # extra hybrid rows, same chunks

1. Ingestion: chunks/s of `KnowledgeService.ingest_files` (read, split, embed, write to
   Chroma, manifest commits) against the embedding model's raw `encode` of the very same
   chunk texts with the same batch size. Target: >= 0.85x.
2. Latency: p50/p95 of `KnowledgeService.query` (query embedding + search) per mode at each
   size. The large chunk sets are synthetic: texts drawn from a vocabulary, vectors made
   from real embeddings of a few thousand of them plus noise (embedding 100k chunks on
   2 cores would take over an hour and measure nothing new). Target: hybrid p50 <= 15 ms
   at 100k.
3. Quality (needs BEIR SciFact: corpus.jsonl, queries.jsonl, qrels/test.tsv): nDCG@10 and
   recall@10 per mode, documents ranked by their best chunk. Target: hybrid >= vector + 2.
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
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lorag.config import load_settings  # noqa: E402
from lorag.knowledge.ingest import SourceFile  # noqa: E402
from lorag.knowledge.manifest import DocRecord, Manifest, chunk_id_for, doc_id_for  # noqa: E402
from lorag.knowledge.service import KnowledgeService  # noqa: E402

WORDS = ["river", "mountain", "copper", "violin", "orbit", "harbor", "lantern", "meadow", "signal", "glacier", "quartz", "falcon", "cinnamon", "turbine", "archive", "compass", "velvet", "thunder", "saffron", "ledger", "canyon", "beacon", "protein", "enzyme", "membrane", "receptor", "neuron", "cortex", "tumor", "vaccine", "antibody", "genome", "mutation", "insulin", "kidney", "liver", "plasma", "lattice", "photon", "quantum", "magnet", "crystal", "polymer", "catalyst", "reactor", "voltage", "circuit", "sensor", "robot", "market", "invoice", "contract", "tariff", "budget", "pension", "mortgage", "dividend", "auditor", "revenue", "subsidy"]


def sentence(rng: random.Random, n: int = 12) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[index]


def open_service(state: Path, **overrides: Any) -> KnowledgeService:
    config = state / "bench.toml"
    state.mkdir(parents=True, exist_ok=True)
    config.write_text("", encoding="utf-8")
    values = {"state_dir": str(state), **overrides}
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
    # Raw encode runs twice and is averaged: a shared 2-core machine drifts over a minute.
    start = time.perf_counter()
    embedder.model.encode(texts, batch_size=embedder.settings.batch_size, show_progress_bar=False, normalize_embeddings=True)
    raw_s = time.perf_counter() - start
    start = time.perf_counter()
    embedder.model.encode(texts, batch_size=embedder.settings.batch_size, show_progress_bar=False, normalize_embeddings=True)
    raw_s = (raw_s + time.perf_counter() - start) / 2
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
        embed_ms = []
        for text in query_texts[:50]:
            t = time.perf_counter()
            service.embedder.encode_query(text)
            embed_ms.append((time.perf_counter() - t) * 1000)
        row["query_embedding_p50_ms"] = round(percentile(embed_ms, 50), 2)
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


def load_scifact(directory: Path) -> tuple[dict[str, dict[str, str]], dict[str, str], dict[str, dict[str, int]]]:
    corpus = {}
    for line in (directory / "corpus.jsonl").read_text(encoding="utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            corpus[str(record["_id"])] = {"title": record.get("title", ""), "text": record.get("text", "")}
    queries = {}
    for line in (directory / "queries.jsonl").read_text(encoding="utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            queries[str(record["_id"])] = record["text"]
    qrels: dict[str, dict[str, int]] = {}
    for n, line in enumerate((directory / "qrels" / "test.tsv").read_text(encoding="utf-8").splitlines()):
        parts = line.split("\t")
        if n == 0 and not parts[-1].strip().lstrip("-").isdigit():
            continue  # header
        qrels.setdefault(parts[0], {})[parts[1]] = int(parts[2])
    return corpus, queries, qrels


def ndcg_at_k(ranked: list[str], relevant: dict[str, int], k: int = 10) -> float:
    dcg = sum(relevant.get(doc, 0) / math.log2(i + 2) for i, doc in enumerate(ranked[:k]))
    ideal = sorted(relevant.values(), reverse=True)[:k]
    idcg = sum(rel / math.log2(i + 2) for i, rel in enumerate(ideal))
    return dcg / idcg if idcg else 0.0


def bench_quality(
    service: KnowledgeService, directory: Path, depth: int = 100, fusion: list[str] | None = None
) -> dict[str, Any]:
    corpus, queries, qrels = load_scifact(directory)
    kb = "bench-scifact"
    if not service.exists(kb):
        service.create(kb)
    files = [
        SourceFile(source=doc_id, name=f"{doc_id}.txt", data=f"{doc['title']}\n{doc['text']}".encode(), origin="record")
        for doc_id, doc in corpus.items()
    ]
    start = time.perf_counter()
    report = service.ingest_files(kb, files)
    print(f"  ingested {len(files)} documents ({report.chunks_written} new chunks) in {time.perf_counter() - start:.0f} s", flush=True)
    judged = [q for q in qrels if q in queries]
    result: dict[str, Any] = {"documents": len(corpus), "queries": len(judged), "depth": depth}
    for mode in ("vector", "keyword", "hybrid"):
        result[mode] = score_mode(service, kb, mode, judged, queries, qrels, depth)
        print(f"  {mode}: {result[mode]}", flush=True)
    # Fusion settings are read per query, so each one is scored on the same ingested chunks.
    retrieval = service.settings.retrieval
    defaults = retrieval.model_dump()
    sweep = []
    for spec in fusion or []:
        values = parse_fusion(spec)
        for key, value in values.items():
            setattr(retrieval, key, value)
        row = {**values, **score_mode(service, kb, "hybrid", judged, queries, qrels, depth)}
        print(f"  hybrid {spec}: {row}", flush=True)
        sweep.append(row)
        for key in values:
            setattr(retrieval, key, defaults[key])
    if sweep:
        result["hybrid_sweep"] = sweep
    return result


FUSION_KEYS = {"rrf_k": int, "vector_weight": float, "keyword_weight": float, "candidates": int}


def parse_fusion(spec: str) -> dict[str, Any]:
    """'rrf_k=20,keyword_weight=0.5' -> {'rrf_k': 20, 'keyword_weight': 0.5}."""
    values: dict[str, Any] = {}
    for part in spec.split(","):
        key, _, raw = part.partition("=")
        key = key.strip()
        if key not in FUSION_KEYS or not raw.strip():
            raise SystemExit(f"--fusion: expected key=value with key in {sorted(FUSION_KEYS)}, got {part!r}")
        values[key] = FUSION_KEYS[key](raw)
    return values


def score_mode(
    service: KnowledgeService, kb: str, mode: str, judged: list[str], queries: dict[str, str],
    qrels: dict[str, dict[str, int]], depth: int,
) -> dict[str, float]:
    """Mean nDCG@10 and recall@10 (in %) over the judged queries; a document ranks by its best chunk."""
    ndcgs, recalls = [], []
    for qid in judged:
        hits = service.query(kb, queries[qid], top_k=depth, mode=mode)
        ranked: list[str] = []
        for hit in hits:
            if hit.source not in ranked:
                ranked.append(hit.source)
        relevant = {d: r for d, r in qrels[qid].items() if r > 0}
        ndcgs.append(ndcg_at_k(ranked, relevant))
        recalls.append(len(set(ranked[:10]) & set(relevant)) / len(relevant) if relevant else 0.0)
    return {"ndcg@10": round(100 * statistics.mean(ndcgs), 2), "recall@10": round(100 * statistics.mean(recalls), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000", help="Chunk counts for the latency runs.")
    parser.add_argument("--queries", type=int, default=200, help="Queries per mode and size.")
    parser.add_argument("--ingest-docs", type=int, default=120, help="Documents for the ingestion run.")
    parser.add_argument("--scifact", type=Path, default=None, help="Folder with BEIR SciFact files.")
    parser.add_argument("--state", type=Path, default=None, help="State directory (default: a temporary one).")
    parser.add_argument("--depth", type=int, default=100, help="SciFact: chunks fetched per query (hybrid fuses max(depth, candidates) per retriever).")
    parser.add_argument(
        "--fusion", action="append", default=None, metavar="KEY=VALUE,...",
        help="SciFact: also score hybrid with these retrieval settings (rrf_k, vector_weight, keyword_weight, candidates); repeatable.",
    )
    parser.add_argument("--skip-ingest", action="store_true")
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--json", type=Path, default=None, help="Also write the results here.")
    parser.add_argument("--quiet-load", type=float, default=None, help="Wait for a 1-min load average below this before timing queries.")
    parser.add_argument("--quiet-wait", type=float, default=900, help="... but no longer than this many seconds.")
    args = parser.parse_args()
    for spec in args.fusion or []:
        parse_fusion(spec)  # a typo fails now, not after a long ingestion
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
    with tempfile.TemporaryDirectory(prefix="lorag-bench-") as tmp:
        service = open_service(args.state or Path(tmp))
        try:
            if not args.skip_ingest:
                print("ingestion throughput ...", flush=True)
                wait_for_quiet(args.quiet_load, args.quiet_wait)
                results["ingestion"] = bench_ingestion(service, args.ingest_docs)
                print(f"  {json.dumps(results['ingestion'])}", flush=True)
            if not args.skip_latency:
                print("query latency ...", flush=True)
                sizes = [int(s) for s in args.sizes.split(",") if s]
                results["latency"] = bench_latency(service, sizes, args.queries, (args.quiet_load, args.quiet_wait))
            if args.scifact:
                print("retrieval quality on SciFact ...", flush=True)
                results["scifact"] = bench_quality(service, args.scifact, args.depth, args.fusion)
        finally:
            service.close()
    results["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
