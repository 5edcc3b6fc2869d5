"""Documents cut into chunks: the splitter in the embedding model's tokens, and each chunk's
citation metadata (source, title, location, hashes)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lorag.knowledge.embeddings import Embedder
from lorag.knowledge.manifest import DocRecord, chunk_id_for, doc_id_for
from lorag.knowledge.readers import ReadResult, location_of
from lorag.knowledge.source_files import SourceFile
from lorag.knowledge.store import KBInfo
from lorag.schema import now_iso


class Chunker:
    """llama-index splitter measured in the embedding model's tokens."""

    def __init__(self, info: KBInfo, embedder: Embedder) -> None:
        from llama_index.core.node_parser import SentenceSplitter, TokenTextSplitter

        # Leave room for the special tokens the model adds ([CLS], [SEP]).
        size = min(info.chunk_size, max(16, embedder.max_tokens - 4))
        overlap = min(info.chunk_overlap, size // 2)
        self.splitter: Any
        if info.splitter == "token":
            self.splitter = TokenTextSplitter(chunk_size=size, chunk_overlap=overlap, tokenizer=embedder.count_tokens)
        else:
            self.splitter = SentenceSplitter(
                chunk_size=size, chunk_overlap=overlap, tokenizer=embedder.count_tokens, include_prev_next_rel=False
            )

    def split(self, text: str) -> list[str]:
        return [piece for piece in self.splitter.split_text(text) if piece.strip()]


@dataclass
class Chunk:
    id: str
    text: str
    metadata: dict[str, Any]


@dataclass
class PreparedDoc:
    record: DocRecord  # what the manifest will hold once committed
    chunks: list[Chunk]


def prepare(file: SourceFile, data: bytes, content_hash: str, read: ReadResult, chunker: Chunker) -> PreparedDoc:
    """Cut a read document into chunks with the metadata a citation needs."""
    doc_id = doc_id_for(file.source)
    ingested_at = now_iso()
    chunks: list[Chunk] = []
    for segment in read.segments:
        for piece in chunker.split(segment.text):
            index = len(chunks)
            meta: dict[str, Any] = {
                "source": file.source,
                "doc_id": doc_id,
                "title": segment.title or read.title,
                "file_type": read.file_type,
                "origin": file.origin,
                "content_hash": content_hash,
                "chunk_index": index,
                "ingested_at": ingested_at,
                "location": location_of(segment.page, segment.section),
            }
            if segment.page is not None:
                meta["page"] = segment.page
            if segment.section:
                meta["section"] = segment.section
            chunks.append(Chunk(chunk_id_for(doc_id, content_hash, index), piece, meta))
    record = DocRecord(
        doc_id=doc_id,
        source=file.source,
        content_hash=content_hash,
        n_chunks=len(chunks),
        bytes=len(data),
        title=read.title,
        file_type=read.file_type,
        origin=file.origin,
        ingested_at=ingested_at,
    )
    return PreparedDoc(record, chunks)
