"""llama-index Documents and nodes into a lorag knowledge base, through lorag's ingestion.

Each item (a `Document`, a `TextNode`, any `BaseNode` with text) is a segment of a lorag
document; items with the same source (`source`, `file_path`, `url` or `uri` metadata, else
the node's `ref_doc_id`, else its id) form one document, so the pages a PDF reader returns
are one document with a page each. Items are split with the base's splitter like any file: a
node that fits the base's chunk size stays one chunk (the splitter leaves it whole), a longer one
is split, since the embedding model would truncate it. Citations get page, section and title
from the metadata (lorag.knowledge.llama_metadata); other metadata is not kept on chunks.
A document is versioned by the hash of its segments, so ingesting the same items again writes
nothing and a changed one replaces its chunks.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

import numpy as np
from llama_index.core.schema import BaseNode, Document, MetadataMode

from lorag.knowledge.ingest import IngestReport
from lorag.knowledge.llama_metadata import page_of, section_of, source_of, title_of
from lorag.knowledge.llama_write import ORIGIN, Incoming, write_incoming
from lorag.knowledge.segments import ReadResult, Segment
from lorag.knowledge.service import KnowledgeService
from lorag.knowledge.source_files import SourceFile
from lorag.logging import get_logger

log = get_logger("lorag.knowledge.llama_documents")
SOURCE_PREFIX = "llama-index:"  # the source of an item whose metadata names none


def source_for(node: BaseNode) -> str:
    """The lorag source an item belongs to."""
    named = source_of(node.metadata or {})
    if named:
        return named
    parent = None if isinstance(node, Document) else node.ref_doc_id
    return SOURCE_PREFIX + (parent or node.node_id)


def segment_for(node: BaseNode) -> Segment:
    meta = node.metadata or {}
    return Segment(
        text=node.get_content(metadata_mode=MetadataMode.NONE),
        page=page_of(meta),
        section=section_of(meta),
        title=title_of(meta) or None,
    )


def incoming_documents(
    nodes: Iterable[BaseNode], vectors: Sequence[Sequence[float]] | np.ndarray | None = None
) -> list[Incoming]:
    """Items grouped into lorag documents by source, in the order given; items without text are
    left out. With `vectors` (one per item) each document brings its segments' vectors and the
    llama-index node ids (chunk metadata `llama_node_id`), for one chunk per segment."""
    grouped: dict[str, list[tuple[BaseNode, Segment, int]]] = {}
    for position, node in enumerate(nodes):
        segment = segment_for(node)
        if segment.text.strip():
            grouped.setdefault(source_for(node), []).append((node, segment, position))
    documents = []
    for source, members in grouped.items():
        segments = [segment for _, segment, _ in members]
        title = next((s.title for s in segments if s.title), "") or source.rsplit("/", 1)[-1]
        # What versions the document: its segments and, for an import, the node ids.
        data = json.dumps(
            [[s.text, s.page, s.section, s.title] for s in segments]
            + ([[node.node_id for node, _, _ in members]] if vectors is not None else []),
            ensure_ascii=False,
        ).encode()
        doc = Incoming(
            SourceFile(source=source, name=source.rsplit("/", 1)[-1], data=data, origin=ORIGIN),
            ReadResult(file_type=ORIGIN, title=title, segments=segments),
        )
        if vectors is not None:
            doc.vectors = np.asarray([vectors[position] for _, _, position in members], dtype=np.float32)
            doc.chunk_metadata = [{"llama_node_id": node.node_id} for node, _, _ in members]
        documents.append(doc)
    return documents


def ingest_documents(
    service: KnowledgeService, kb: str, items: Iterable[BaseNode], *, create: bool = False
) -> IngestReport:
    """Ingest llama-index Documents and nodes into `kb` (created first with `create`)."""
    if create and not service.exists(kb):
        service.create(kb)
    documents = incoming_documents(items)
    log.info("kb.llama.ingest", kb=kb, documents=len(documents))
    return write_incoming(service, kb, documents)

