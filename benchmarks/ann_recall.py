"""ANN benchmark (not a test): Chroma HNSW recall against exact search, and what it costs.

    python benchmarks/ann_recall.py                          # 10k and 100k synthetic chunks + real corpus
    python benchmarks/ann_recall.py --sizes 10000 --no-real  # quick
    python benchmarks/ann_recall.py --builds 16/100,32/200 --efs 100,200,400
    # what the issue-15 figures come from (a busy 2-core machine: Chroma alone, no model):
    python benchmarks/ann_recall.py --no-synthetic --real-store /tmp/retrieval-cache/cranfield \
        --real-store /tmp/retrieval-cache/cisi           # real corpus, vectors cached for --raw
    python benchmarks/ann_recall.py --raw --sizes 10000,100000 --queries 100

Why: Chroma's HNSW is approximate and shaped by insertion order, so the same chunks
written in another order (a kill -9 and a re-run) can rank differently. Per build setting
(hnsw:M / construction_ef) and per search ef this prints recall@10 and recall@100 against
an exact (numpy) search, and p50 latency of `KnowledgeService.query` in vector and hybrid
mode; the exact path (vector_index.exact_max_chunks) is timed too. "16/100 ef 100" is
Chroma's default, i.e. lorag before knowledge.vector_index existed.

1. Synthetic chunks at each size, written as ingestion writes them: vectors are real
   embeddings of 2,000 generated texts plus noise (the vector model of
   benchmarks/retrieval.py's latency run), queries are real query embeddings.
2. A real corpus: Cranfield + CISI documents (../shared/data/retrieval, see its README)
   embedded with the knowledge base's model, their own queries; also how many queries get
   the same top-10 when the corpus is inserted in two different orders.

Figures depend on the machine's load: the load average is printed with them.
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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lorag.config import load_settings  # noqa: E402
from lorag.knowledge.manifest import DocRecord, Manifest, chunk_id_for, doc_id_for  # noqa: E402
from lorag.knowledge.service import KnowledgeService  # noqa: E402

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "retrieval"
WORDS = ["river", "mountain", "copper", "violin", "orbit", "harbor", "lantern", "meadow", "signal", "glacier", "quartz", "falcon", "cinnamon", "turbine", "archive", "compass", "velvet", "thunder", "saffron", "ledger", "canyon", "beacon", "protein", "enzyme", "membrane", "receptor", "neuron", "cortex", "tumor", "vaccine", "antibody", "genome", "mutation", "insulin", "kidney", "liver", "plasma", "lattice", "photon", "quantum", "magnet", "crystal", "polymer", "catalyst", "reactor", "voltage", "circuit", "sensor", "robot", "market", "invoice", "contract", "tariff", "budget", "pension", "mortgage", "dividend", "auditor", "revenue", "subsidy"]


def sentence(rng: random.Random, n: int = 12) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def p50(values: list[float]) -> float:
    return round(statistics.median(values), 2)


def settings_overrides(m: int, efc: int, ef: int, exact: int) -> dict[str, Any]:
    return {
        "knowledge.vector_index.hnsw_m": m,
        "knowledge.vector_index.hnsw_construction_ef": efc,
        "knowledge.vector_index.hnsw_search_ef": ef,
        "knowledge.vector_index.exact_max_chunks": exact,
    }


@contextmanager
def opened(state: Path, overrides: dict[str, Any]) -> Iterator[KnowledgeService]:
    """A fresh service and Chroma client (Chroma reads ef_search when it loads an index)."""
    from chromadb.api.client import SharedSystemClient

    SharedSystemClient.clear_system_cache()
    config = state / "bench.toml"
    state.mkdir(parents=True, exist_ok=True)
    config.write_text("", encoding="utf-8")
    values: dict[str, Any] = {"state_dir": str(state), **overrides}
    service = KnowledgeService.from_settings(load_settings(config, values))
    try:
        yield service
    finally:
        service.close()


def exact_top(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Row indices of the k most similar vectors per query (cosine; both sides unit length)."""
    out = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), 64):
        scores = queries[start : start + 64] @ vectors.T
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
        out[start : start + 64] = np.take_along_axis(top, order, axis=1)
    return out


def recall(found: list[list[str]], truth: np.ndarray, ids: list[str], k: int) -> float:
    return round(float(np.mean([len(set(f[:k]) & {ids[n] for n in t[:k]}) / k for f, t in zip(found, truth, strict=True)])), 4)


def ann_ids(collection: Any, queries: np.ndarray, k: int) -> list[list[str]]:
    found: list[list[str]] = []
    for start in range(0, len(queries), 50):
        result = collection.query(query_embeddings=queries[start : start + 50], n_results=k, include=["distances"])
        found.extend(result["ids"])
    return found


# ---------------------------------------------------------------------------- 1. synthetic


def synthetic(size: int, base: np.ndarray, base_texts: list[str]) -> tuple[list[str], np.ndarray, list[str], list[dict[str, Any]]]:
    rng = np.random.default_rng(size)
    text_rng = random.Random(size)
    picks = rng.integers(0, len(base), size)
    vectors = base[picks] + rng.normal(0, 0.35 / math.sqrt(base.shape[1]), (size, base.shape[1]))
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    ids, texts, metas = [], [], []
    for n in range(size):
        doc, index = n // 10, n % 10
        source = f"synthetic/doc{doc:06d}.txt"
        content_hash = f"{doc:064x}"
        ids.append(chunk_id_for(doc_id_for(source), content_hash, index))
        texts.append(base_texts[picks[n]] + " " + sentence(text_rng, 20))
        metas.append({"source": source, "doc_id": doc_id_for(source), "content_hash": content_hash,
                      "chunk_index": index, "title": f"Doc {doc}", "location": "", "page": 1 + index // 3})
    return ids, vectors, texts, metas


def write_base(service: KnowledgeService, kb: str, ids: list[str], vectors: np.ndarray, texts: list[str], metas: list[dict[str, Any]]) -> float:
    """The chunks and manifest records, written straight into the collections."""
    service.create(kb)
    chunks, manifest_collection = service.store.collections(kb)
    started = time.perf_counter()
    for start in range(0, len(ids), 1000):
        end = start + 1000
        chunks.upsert(ids=ids[start:end], embeddings=vectors[start:end], documents=texts[start:end], metadatas=metas[start:end])
    records = {m["doc_id"]: DocRecord(doc_id=m["doc_id"], source=m["source"], content_hash=m["content_hash"], n_chunks=10) for m in metas}
    Manifest(manifest_collection).put(records.values())
    service._changed(kb)
    return time.perf_counter() - started


def time_queries(service: KnowledgeService, kb: str, texts: list[str], mode: str) -> float:
    for text in texts[:5]:
        service.query(kb, text, top_k=10, mode=mode)  # warm-up (and index loads)
    times = []
    for text in texts:
        t = time.perf_counter()
        service.query(kb, text, top_k=10, mode=mode)
        times.append((time.perf_counter() - t) * 1000)
    return p50(times)


def bench_synthetic(size: int, builds: list[tuple[int, int]], efs: list[int], root: Path, base: np.ndarray,
                    base_texts: list[str], query_texts: list[str], query_vectors: np.ndarray, latency_queries: int) -> list[dict[str, Any]]:
    ids, vectors, texts, metas = synthetic(size, base, base_texts)
    truth = exact_top(vectors, query_vectors, 100)
    rows = []
    for m, efc in builds:
        state = root / f"s{size}-m{m}-efc{efc}"
        with opened(state, settings_overrides(m, efc, efs[0], 0)) as service:
            build_s = write_base(service, "bench", ids, vectors, texts, metas)
        for ef in efs:
            with opened(state, settings_overrides(m, efc, ef, 0)) as service:
                service.keyword_index("bench")
                chunks, _ = service.store.collections("bench")
                started = time.perf_counter()
                found = ann_ids(chunks, query_vectors, 100)
                search_ms = (time.perf_counter() - started) * 1000 / len(query_vectors)
                row = {
                    "chunks": size, "M": m, "construction_ef": efc, "search_ef": ef, "build_s": round(build_s, 1),
                    "recall@10": recall(found, truth, ids, 10), "recall@100": recall(found, truth, ids, 100),
                    "chroma_k100_ms": round(search_ms, 2),
                    "vector_p50_ms": time_queries(service, "bench", query_texts[:latency_queries], "vector"),
                    "hybrid_p50_ms": time_queries(service, "bench", query_texts[:latency_queries], "hybrid"),
                    "load_avg": round(os.getloadavg()[0], 1),
                }
            print(json.dumps(row), flush=True)
            rows.append(row)
    # The exact path on the same chunks (any build will do: HNSW is not consulted).
    m, efc = builds[-1]
    with opened(root / f"s{size}-m{m}-efc{efc}", settings_overrides(m, efc, efs[0], size)) as service:
        service.keyword_index("bench")
        started = time.perf_counter()
        service._exact_index("bench")
        load_s = time.perf_counter() - started
        index = service._exact_index("bench")
        assert index is not None
        started = time.perf_counter()
        found = [[h.id for h in index.search(q.tolist(), 100)] for q in query_vectors]
        search_ms = (time.perf_counter() - started) * 1000 / len(query_vectors)
        row = {
            "chunks": size, "exact": True, "exact_load_s": round(load_s, 2), "exact_k100_ms": round(search_ms, 2),
            "recall@10": recall(found, truth, ids, 10), "recall@100": recall(found, truth, ids, 100),
            "vector_p50_ms": time_queries(service, "bench", query_texts[:latency_queries], "vector"),
            "hybrid_p50_ms": time_queries(service, "bench", query_texts[:latency_queries], "hybrid"),
            "load_avg": round(os.getloadavg()[0], 1),
        }
    print(json.dumps(row), flush=True)
    rows.append(row)
    return rows


def bench_raw(size: int, builds: list[tuple[int, int]], efs: list[int], root: Path, base: np.ndarray,
              query_vectors: np.ndarray) -> list[dict[str, Any]]:
    """Chroma alone (vectors only, no texts): recall and search time per setting, fast to build.

    The hybrid latency of a setting is the service's hybrid p50 with Chroma's default plus
    the difference in `chroma_k50_ms` (hybrid asks each retriever for 50 candidates).
    """
    import chromadb
    from chromadb.api.client import SharedSystemClient
    from chromadb.config import Settings as ChromaSettings

    rng = np.random.default_rng(size)
    picks = rng.integers(0, len(base), size)
    vectors = base[picks] + rng.normal(0, 0.35 / math.sqrt(base.shape[1]), (size, base.shape[1]))
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    ids = [f"c{n:07d}" for n in range(size)]
    truth = exact_top(vectors, query_vectors, 100)
    rows = []
    for m, efc in builds:
        path = str(root / f"raw{size}-{m}-{efc}")
        for ef in efs:
            SharedSystemClient.clear_system_cache()
            client = chromadb.PersistentClient(path=path, settings=ChromaSettings(anonymized_telemetry=False))
            row: dict[str, Any] = {"chunks": size, "M": m, "construction_ef": efc, "search_ef": ef}
            if ef == efs[0]:
                collection = client.create_collection(
                    "raw", embedding_function=None,
                    configuration={"hnsw": {"space": "cosine", "max_neighbors": m, "ef_construction": efc, "ef_search": ef}},
                )
                started = time.perf_counter()
                for start in range(0, size, 5000):
                    collection.add(ids=ids[start : start + 5000], embeddings=vectors[start : start + 5000])
                row["build_s"] = round(time.perf_counter() - started, 1)
            else:
                collection = client.get_collection("raw", embedding_function=None)
                collection.modify(configuration={"hnsw": {"ef_search": ef}})
                SharedSystemClient.clear_system_cache()  # Chroma reads ef_search when it loads the index
                client = chromadb.PersistentClient(path=path, settings=ChromaSettings(anonymized_telemetry=False))
                collection = client.get_collection("raw", embedding_function=None)
            found = ann_ids(collection, query_vectors, 100)
            row["recall@10"] = recall(found, truth, ids, 10)
            row["recall@100"] = recall(found, truth, ids, 100)
            for k in (50, 100):
                times = []
                for q in query_vectors:
                    t = time.perf_counter()
                    collection.query(query_embeddings=[q], n_results=k, include=["distances"])
                    times.append((time.perf_counter() - t) * 1000)
                row[f"chroma_k{k}_p50_ms"] = p50(times)
            row["load_avg"] = round(os.getloadavg()[0], 1)
            print(json.dumps(row), flush=True)
            rows.append(row)
    from lorag.knowledge.vector_index import ExactIndex

    started = time.perf_counter()
    index = ExactIndex(ids, vectors, [""] * size, [{} for _ in range(size)])
    setup_s = time.perf_counter() - started
    times, found = [], []
    for q in query_vectors:
        t = time.perf_counter()
        found.append([h.id for h in index.search(q.tolist(), 100)])
        times.append((time.perf_counter() - t) * 1000)
    row = {"chunks": size, "exact": True, "exact_setup_s": round(setup_s, 2), "recall@10": recall(found, truth, ids, 10),
           "recall@100": recall(found, truth, ids, 100), "exact_k100_p50_ms": p50(times), "load_avg": round(os.getloadavg()[0], 1)}
    print(json.dumps(row), flush=True)
    rows.append(row)
    return rows


# ---------------------------------------------------------------------------- 2. real corpus


def real_corpus(service: KnowledgeService, cache: Path, stores: list[Path]) -> tuple[list[str], np.ndarray, np.ndarray] | None:
    """Cranfield + CISI chunks and queries, embedded once (cached). `stores`: lorag state
    directories where `lorag kb ingest <set> .../<set>/corpus.jsonl` already embedded them
    (named after the set); their chunk vectors are read instead of embedding again."""
    import shutil

    import chromadb
    from chromadb.config import Settings as ChromaSettings

    cache.mkdir(parents=True, exist_ok=True)
    cached = cache / "cranfield_cisi.npz"
    if cached.exists():
        data = np.load(cached)
        return [str(i) for i in data["ids"]], data["docs"], data["queries"]
    ids: list[str] = []
    parts: list[np.ndarray] = []
    queries: list[str] = []
    for name in ("cranfield", "cisi"):
        folder = DATA / name
        if not folder.is_dir():
            print(f"  {folder} is missing: no real-corpus figures", flush=True)
            return None
        queries.extend(json.loads(line)["text"] for line in (folder / "queries.jsonl").read_text(encoding="utf-8").splitlines())
        store = next((s for s in stores if s.name == name), None)
        if store is not None:
            with tempfile.TemporaryDirectory() as tmp:  # a copy: the original may be locked
                shutil.copytree(store / "knowledge" / "chroma", f"{tmp}/chroma", ignore=shutil.ignore_patterns("lorag.lock"))
                got = chromadb.PersistentClient(f"{tmp}/chroma", settings=ChromaSettings(anonymized_telemetry=False)).get_collection(name).get(include=["embeddings"])
            ids.extend(f"{name}:{i}" for i in got["ids"])
            parts.append(np.asarray(got["embeddings"], dtype=np.float32))
            continue
        texts = []
        for line in (folder / "corpus.jsonl").read_text(encoding="utf-8").splitlines():
            doc = json.loads(line)
            text = (doc.get("title", "") + "\n" + doc.get("text", "")).strip()
            if text:
                ids.append(f"{name}:{doc['_id']}")
                texts.append(text)
        parts.append(service.embedder.encode_documents(texts).astype(np.float32))
    docs = np.concatenate(parts)
    query_vectors = np.stack([service.embedder.encode_query(q) for q in queries]).astype(np.float32)
    np.savez(cached, ids=np.array(ids), docs=docs, queries=query_vectors)
    return ids, docs, query_vectors


def bench_real(corpus: tuple[list[str], np.ndarray, np.ndarray], builds: list[tuple[int, int]], efs: list[int]) -> list[dict[str, Any]]:
    import chromadb
    from chromadb.api.client import SharedSystemClient
    from chromadb.config import Settings as ChromaSettings

    ids, docs, queries = corpus
    truth = exact_top(docs / np.linalg.norm(docs, axis=1, keepdims=True), queries / np.linalg.norm(queries, axis=1, keepdims=True), 100)
    orders = {"file": list(range(len(ids))), "shuffled": random.Random(1).sample(range(len(ids)), len(ids))}
    rows = []
    with tempfile.TemporaryDirectory(prefix="lorag-ann-real-") as tmp:
        for m, efc in builds:
            for ef in efs:
                tops: dict[str, list[list[str]]] = {}
                row: dict[str, Any] = {"corpus": "cranfield+cisi", "chunks": len(ids), "M": m, "construction_ef": efc, "search_ef": ef}
                for order_name, order in orders.items():
                    SharedSystemClient.clear_system_cache()
                    client = chromadb.PersistentClient(path=f"{tmp}/{m}-{efc}-{ef}-{order_name}", settings=ChromaSettings(anonymized_telemetry=False))
                    collection = client.create_collection(
                        "real", embedding_function=None,
                        configuration={"hnsw": {"space": "cosine", "max_neighbors": m, "ef_construction": efc, "ef_search": ef}},
                    )
                    for start in range(0, len(order), 1000):
                        part = order[start : start + 1000]
                        collection.add(ids=[ids[n] for n in part], embeddings=docs[part])
                    found = ann_ids(collection, queries, 100)
                    tops[order_name] = [f[:10] for f in found]
                    row[f"recall@10_{order_name}"] = recall(found, truth, ids, 10)
                    row[f"recall@100_{order_name}"] = recall(found, truth, ids, 100)
                same = sum(a == b for a, b in zip(tops["file"], tops["shuffled"], strict=True))
                row["same_top10_both_orders"] = f"{same}/{len(queries)}"
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


def parse_builds(spec: str) -> list[tuple[int, int]]:
    return [(int(m), int(efc)) for m, efc in (part.split("/") for part in spec.split(",") if part)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000", help="Synthetic chunk counts.")
    parser.add_argument("--builds", default="16/100,32/200", help="hnsw M/construction_ef pairs (16/100 = Chroma's default).")
    parser.add_argument("--efs", default="100,200,400", help="hnsw search_ef values per build.")
    parser.add_argument("--queries", type=int, default=200, help="Queries for recall.")
    parser.add_argument("--latency-queries", type=int, default=100, help="Queries timed per mode.")
    parser.add_argument("--no-real", action="store_true", help="Skip the Cranfield + CISI run.")
    parser.add_argument("--no-synthetic", action="store_true", help="Only the Cranfield + CISI run.")
    parser.add_argument(
        "--raw", action="store_true",
        help="Synthetic runs on Chroma alone, vectors around the real corpus's (no model, no service latency).",
    )
    parser.add_argument(
        "--real-store", type=Path, action="append", default=[],
        help="A lorag state dir named cranfield or cisi holding that set ingested (reuses its vectors).",
    )
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "lorag-ann-cache")
    parser.add_argument("--json", type=Path, default=None, help="Also write the results here.")
    args = parser.parse_args()
    os.environ.setdefault("LORAG_LOG_LEVEL", "warning")
    from lorag.logging import configure_logging

    configure_logging(level=os.environ["LORAG_LOG_LEVEL"])
    builds, efs = parse_builds(args.builds), [int(e) for e in args.efs.split(",")]
    results: dict[str, Any] = {"cpus": os.cpu_count(), "load_avg_start": [round(x, 2) for x in os.getloadavg()]}
    with tempfile.TemporaryDirectory(prefix="lorag-ann-") as tmp:
        root = Path(tmp)
        with opened(root / "embed", {}) as service:
            rng = random.Random(7)
            base_texts = [" ".join(sentence(rng, 10) for _ in range(2)) for _ in range(2000)]
            query_texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8))) for _ in range(args.queries)]
            base = query_vectors = np.zeros((0, 0), np.float32)
            if not args.no_synthetic and not args.raw:
                base = service.embedder.encode_documents(base_texts).astype(np.float32)
                query_vectors = np.stack([service.embedder.encode_query(t) for t in query_texts]).astype(np.float32)
            corpus = None if args.no_real else real_corpus(service, args.cache, args.real_store)
        if corpus is not None and not args.raw:
            print("real corpus (Cranfield + CISI) ...", flush=True)
            results["real"] = bench_real(corpus, builds, efs)
        results["synthetic"] = []
        for size in (int(s) for s in args.sizes.split(",") if s and args.raw):
            assert corpus is not None, "--raw builds on the real corpus's vectors"
            print(f"synthetic (Chroma alone), {size} chunks ...", flush=True)
            results["synthetic"] += bench_raw(size, builds, efs, root, corpus[1], corpus[2][: args.queries])
        for size in (int(s) for s in args.sizes.split(",") if s and not args.no_synthetic and not args.raw):
            print(f"synthetic, {size} chunks ...", flush=True)
            results["synthetic"] += bench_synthetic(
                size, builds, efs, root, base, base_texts, query_texts, query_vectors, args.latency_queries
            )
    results["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
