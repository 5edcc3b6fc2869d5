"""The per-knowledge-base document manifest: the commit log of ingestion.

One record per document (id = hash of its source). A document's chunks have ids
derived from (document, content hash, chunk index), so old and new versions never
collide. Writing a document is:

    1. record.state = "writing"                (before any chunk is written)
    2. upsert the new chunks
    3. record.content_hash = new hash          (the commit point)
    4. delete the chunks of the old version
    5. record.state = "committed"

Removing one is state = "removing", delete its chunks, delete the record. A record
left in "writing" or "removing" by a crash is finished by `recover`: chunks not of
the committed version are deleted (a removal is completed), so a knowledge base
is always as it was before a document, or as it is after it, never half of one.

Within one process the steps of a group run as a critical section (critical.py): Ctrl-C
is held back until the group is committed, and an error in the middle `settle`s the
group at once, so no record stays "writing" until the next open.
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, TypeVar

COMMITTED = "committed"
WRITING = "writing"
REMOVING = "removing"
WRITE_BATCH = 1000  # ids per Chroma call (below every client's max batch size)
_T = TypeVar("_T")


def doc_id_for(source: str) -> str:
    return hashlib.sha256(source.encode("utf-8")).hexdigest()[:20]


def chunk_id_for(doc_id: str, content_hash: str, index: int) -> str:
    return f"{doc_id}:{content_hash[:16]}:{index}"


def writer_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def batched(items: Sequence[_T], size: int) -> Iterator[Sequence[_T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@dataclass
class DocRecord:
    doc_id: str
    source: str
    content_hash: str = ""  # of the committed version; "" = none committed yet
    n_chunks: int = 0
    state: str = COMMITTED
    pending_hash: str = ""
    bytes: int = 0
    title: str = ""
    file_type: str = ""
    origin: str = "path"
    ingested_at: str = ""
    writer: str = ""
    updated_at: float = 0.0

    def to_metadata(self) -> dict[str, Any]:
        # Chroma's upsert merges metadata, so every key is always written.
        meta = asdict(self)
        meta.pop("doc_id")
        return meta

    @classmethod
    def from_metadata(cls, doc_id: str, meta: dict[str, Any]) -> DocRecord:
        fields = {k: meta[k] for k in cls.__dataclass_fields__ if k in meta and k != "doc_id"}
        return cls(doc_id=doc_id, **fields)

    def is_stale(self, stale_after_s: float) -> bool:
        """Was this record left by a writer that is gone (dead pid here, or silent too long)?"""
        host, _, pid = self.writer.rpartition(":")
        if host == socket.gethostname() and pid.isdigit():
            if int(pid) == os.getpid():
                return False
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                return True
            except PermissionError:
                pass
        return time.time() - self.updated_at > stale_after_s


class Manifest:
    """Typed access to a knowledge base's manifest collection."""

    def __init__(self, collection: Any) -> None:
        self.collection = collection

    def all(self) -> dict[str, DocRecord]:
        result = self.collection.get(include=["metadatas"])
        return {
            doc_id: DocRecord.from_metadata(doc_id, meta or {})
            for doc_id, meta in zip(result["ids"], result["metadatas"] or [], strict=False)
        }

    def unfinished(self) -> list[DocRecord]:
        result = self.collection.get(where={"state": {"$ne": COMMITTED}}, include=["metadatas"])
        return [
            DocRecord.from_metadata(doc_id, meta or {})
            for doc_id, meta in zip(result["ids"], result["metadatas"] or [], strict=False)
        ]

    def put(self, records: Iterable[DocRecord]) -> None:
        now, writer = time.time(), writer_id()
        stamped = [replace(r, updated_at=now, writer=writer) for r in records]
        for batch in batched(stamped, WRITE_BATCH):
            self.collection.upsert(
                ids=[r.doc_id for r in batch],
                embeddings=[[0.0]] * len(batch),  # the manifest is never searched by vector
                metadatas=[r.to_metadata() for r in batch],
            )

    def delete(self, doc_ids: Sequence[str]) -> None:
        for batch in batched(list(doc_ids), WRITE_BATCH):
            self.collection.delete(ids=list(batch))

    def get(self, doc_ids: Sequence[str]) -> list[DocRecord]:
        result = self.collection.get(ids=list(doc_ids), include=["metadatas"])
        return [
            DocRecord.from_metadata(doc_id, meta or {})
            for doc_id, meta in zip(result["ids"], result["metadatas"] or [], strict=False)
        ]

    def count(self) -> int:
        return int(self.collection.count())


def recover(chunks: Any, manifest: Manifest, *, everything: bool, stale_after_s: float) -> int:
    """Finish or undo documents a crashed writer left half-done; returns how many."""
    fixed = 0
    for record in manifest.unfinished():
        if not everything and not record.is_stale(stale_after_s):
            continue  # another live process is writing it
        settle(chunks, manifest, record)
        fixed += 1
    return fixed


def settle(chunks: Any, manifest: Manifest, record: DocRecord) -> None:
    """Bring one unfinished record to a whole state: before its commit point the new
    version's chunks go (rolled back), after it the old version's go (rolled forward)."""
    if record.state == REMOVING or not record.content_hash:
        chunks.delete(where={"doc_id": record.doc_id})
        manifest.delete([record.doc_id])
    else:
        chunks.delete(where={"$and": [{"doc_id": record.doc_id}, {"content_hash": {"$ne": record.content_hash}}]})
        manifest.put([replace(record, state=COMMITTED, pending_hash="")])
