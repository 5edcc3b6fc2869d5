"""Import a llama-index `ChromaVectorStore` collection as a lorag knowledge base, without re-embedding.

A llama-index app that indexed its documents into Chroma with the same embedding model as
lorag's (e.g. through lorag.knowledge.llama_embedding.LoragEmbedding) already holds everything a
base needs: node texts, their vectors and metadata (the node itself in `_node_content`). The
import checks that the vectors are this process's model's (dimension, and a sample of nodes
re-embedded exactly as llama-index embedded them: text with its embed metadata, cosine >= 0.99),
then writes the nodes through lorag's ingestion, one chunk per node with its stored vector, into
a new base. Anything refused or failed leaves no base behind.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from llama_index.core.schema import BaseNode, MetadataMode, TextNode
from llama_index.core.vector_stores.utils import metadata_dict_to_node

from lorag.errors import LoragError
from lorag.knowledge.errors import KnowledgeBaseExists
from lorag.knowledge.ingest import IngestReport
from lorag.knowledge.llama_documents import incoming_documents
from lorag.knowledge.llama_write import write_incoming
from lorag.knowledge.service import KnowledgeService
from lorag.knowledge.store import validate_kb_name
from lorag.logging import get_logger

log = get_logger("lorag.knowledge.llama_import")

MIN_COSINE = 0.99  # a sample node re-embedded here must be at least this close to its stored vector
SAMPLE = 8
_PAGE = 1000  # rows per Chroma read


class EmbeddingCheckFailed(LoragError):
    """The collection's vectors were not made by this process's embedding model."""

    status_code = 409
    error_type = "conflict_error"
    code = "embedding_check_failed"


def open_collection(collection: str, *, path: str | None = None, host: str | None = None, port: int = 8000) -> Any:
    """A llama-index app's Chroma collection: in a persistent directory, or on a Chroma server."""
    import chromadb
    from chromadb.config import Settings as ChromaClientSettings

    settings = ChromaClientSettings(anonymized_telemetry=False)
    if path is None and host is None:
        raise LoragError("name the Chroma directory or server holding the collection", param="chroma_path")
    if path is not None and not (Path(path).expanduser() / "chroma.sqlite3").is_file():
        raise LoragError(f"{path} is not a Chroma directory (no chroma.sqlite3)", param="chroma_path")
    where = str(Path(path).expanduser()) if path is not None else f"{host}:{port}"
    try:
        client: Any = (
            chromadb.PersistentClient(path=where, settings=settings)
            if path is not None
            else chromadb.HttpClient(host=str(host), port=port, settings=settings)
        )
    except Exception as err:
        raise LoragError(f"cannot open Chroma at {where}: {' '.join(str(err).split())}") from None
    try:
        return client.get_collection(collection, embedding_function=None)
    except Exception as err:
        raise LoragError(
            f"Chroma at {where} has no collection {collection!r} ({type(err).__name__})", param="collection"
        ) from None


def read_nodes(collection: Any) -> tuple[list[BaseNode], np.ndarray]:
    """Every node of the collection (rebuilt from `_node_content` where llama-index left it) and its vector."""
    nodes: list[BaseNode] = []
    vectors: list[np.ndarray] = []
    offset = 0
    while True:
        got = collection.get(include=["documents", "metadatas", "embeddings"], limit=_PAGE, offset=offset)
        ids = list(got["ids"])
        if not ids:
            break
        for node_id, text, meta, vector in zip(ids, got["documents"], got["metadatas"], got["embeddings"], strict=True):
            nodes.append(_node(node_id, text or "", dict(meta or {})))
            vectors.append(np.asarray(vector, dtype=np.float32))
        offset += len(ids)
    if not nodes:
        return [], np.zeros((0, 0), dtype=np.float32)
    return nodes, np.stack(vectors)


def _node(node_id: str, text: str, meta: dict[str, Any]) -> BaseNode:
    if "_node_content" in meta:
        try:
            node = metadata_dict_to_node(meta, text=text)
            node.id_ = node_id
            return node
        except Exception:  # another layout: fall back to the row as it is
            log.debug("kb.import.node_content_unreadable", node_id=node_id)
    public = {k: v for k, v in meta.items() if not k.startswith("_") and k not in ("document_id", "doc_id", "ref_doc_id")}
    return TextNode(id_=node_id, text=text, metadata=public)


def check_embeddings(service: KnowledgeService, label: str, nodes: list[BaseNode], vectors: np.ndarray) -> float:
    """Refuse vectors of another model: another dimension, or samples that re-embed elsewhere.
    Returns the lowest cosine of the sample."""
    embedder = service.embedder
    model = f"{embedder.name} ({embedder.dimension} dims)"
    if vectors.shape[1] != embedder.dimension:
        raise EmbeddingCheckFailed(
            f"{label} holds {vectors.shape[1]}-dimensional vectors but this lorag embeds with {model}: "
            "import only collections built with the same model (knowledge.embedding.model)"
        )
    picks = sorted({round(i * (len(nodes) - 1) / max(SAMPLE - 1, 1)) for i in range(min(SAMPLE, len(nodes)))})
    texts = [nodes[i].get_content(metadata_mode=MetadataMode.EMBED) for i in picks]
    fresh = embedder.encode_documents(texts)
    stored = vectors[picks]
    cosines = np.sum(fresh * stored, axis=1) / (
        np.linalg.norm(fresh, axis=1) * np.linalg.norm(stored, axis=1) + 1e-12
    )
    lowest = float(cosines.min())
    if lowest < MIN_COSINE:
        raise EmbeddingCheckFailed(
            f"{label} was not embedded with {model}: its nodes re-embedded here match their stored vectors "
            f"with cosine {lowest:.3f} (< {MIN_COSINE}); import only collections built with the same model"
        )
    return lowest


def import_collection(
    service: KnowledgeService, kb: str, collection: Any, *, description: str = ""
) -> IngestReport:
    """A new knowledge base `kb` holding the collection's nodes and their stored vectors."""
    validate_kb_name(kb)
    label = f"Chroma collection {collection.name!r}"
    if service.exists(kb):
        raise KnowledgeBaseExists(f"knowledge base {kb!r} already exists: import into a new one", param="kb")
    nodes, vectors = read_nodes(collection)
    if not nodes:
        raise LoragError(f"{label} is empty: nothing to import", param="collection")
    lowest = check_embeddings(service, label, nodes, vectors)
    documents = incoming_documents(nodes, vectors)
    service.create(kb, description or f"imported from llama-index {label}")
    try:
        report = write_incoming(service, kb, documents, whole=True)
    except BaseException:
        service.drop(kb)  # no half-imported base
        raise
    log.info("kb.import.llama_index", kb=kb, collection=collection.name, nodes=len(nodes),
             documents=len(documents), chunks=report.chunks_written, min_cosine=round(lowest, 4))
    return report
