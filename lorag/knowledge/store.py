"""The Chroma side of knowledge bases: clients, the store lock, collections and their records.

A knowledge base is two Chroma collections:

* `<kb>` holds the chunks (embedding, text, per-chunk metadata); its collection
  metadata records what the base was built with (embedding model, chunking).
* `lorag-manifest.<kb>` holds one record per document (source, content hash, chunk
  count, state). It is the commit log that makes per-document ingestion atomic, and
  it lives in Chroma so that several processes sharing a Chroma server see one truth.

Chroma's embedded PersistentClient is thread-safe but not process-safe, so one
process owns an embedded store, proven by an exclusive, non-blocking flock on
`<store>/lorag.lock`. A second process gets StoreInUse naming the owner's pid.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from lorag.knowledge.errors import (
    InvalidName,
    KnowledgeBaseExists,
    KnowledgeBaseNotFound,
    StoreInUse,
    StoreUnavailable,
)
from lorag.knowledge.settings import ChromaSettings

MANIFEST_PREFIX = "lorag-manifest."
KB_MARKER = "lorag_kb"
MANIFEST_MARKER = "lorag_manifest"
# Chroma's own rule for collection names (checked here first so the message is ours).
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,126}[A-Za-z0-9]$")
_IPV4_RE = re.compile(r"^\d{1,3}(\.\d{1,3}){3}$")


def validate_kb_name(name: str) -> str:
    """Refuse names Chroma would refuse (or that clash with our own collections), clearly."""
    problems = []
    if not _NAME_RE.match(name):
        problems.append(
            "use 3-128 characters from letters, digits, '.', '_' and '-', starting and ending "
            "with a letter or digit"
        )
    if ".." in name:
        problems.append("no two consecutive periods")
    if _IPV4_RE.match(name):
        problems.append("it must not look like an IPv4 address")
    if name.startswith(MANIFEST_PREFIX.rstrip(".")):
        problems.append(f"names starting with {MANIFEST_PREFIX.rstrip('.')!r} are reserved")
    if problems:
        raise InvalidName(f"invalid knowledge base name {name!r}: " + "; ".join(problems), param="name")
    return name


# ---------------------------------------------------------------------------- lock


class _HeldLock:
    def __init__(self, handle: IO[str]) -> None:
        self.handle = handle
        self.refs = 0


_HELD: dict[str, _HeldLock] = {}
_HELD_GUARD = threading.Lock()


class StoreLock:
    """Exclusive ownership of an embedded store by this process (shared by its threads)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / "lorag.lock"
        self._held = False

    def acquire(self) -> None:
        key = str(self.path)
        with _HELD_GUARD:
            held = _HELD.get(key)
            if held is None:
                self.directory.mkdir(parents=True, exist_ok=True)
                handle = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - held open
                try:
                    fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    handle.seek(0)
                    owner = handle.read().strip() or "unknown"
                    handle.close()
                    raise StoreInUse(
                        f"knowledge store at {self.directory} is in use by process {owner}; "
                        "stop it, use that server's /v1/knowledge API, or share a Chroma "
                        "server (knowledge.chroma.mode = \"http\")"
                    ) from None
                handle.seek(0)
                handle.truncate()
                handle.write(str(os.getpid()))
                handle.flush()
                held = _HELD[key] = _HeldLock(handle)
            held.refs += 1
            self._held = True

    def release(self) -> None:
        key = str(self.path)
        with _HELD_GUARD:
            if not self._held:
                return
            self._held = False
            held = _HELD.get(key)
            if held is None:
                return
            held.refs -= 1
            if held.refs <= 0:
                del _HELD[key]
                with contextlib.suppress(OSError):
                    held.handle.seek(0)
                    held.handle.truncate()
                fcntl.flock(held.handle.fileno(), fcntl.LOCK_UN)
                held.handle.close()


# ---------------------------------------------------------------------------- info


@dataclass
class KBInfo:
    """What a knowledge base was built with, kept in its chunk collection's metadata."""

    name: str
    embedding_model: str
    embedding_fingerprint: str
    embedding_dim: int
    chunk_size: int
    chunk_overlap: int
    splitter: str
    created_at: str
    description: str = ""
    revision: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    # Fusion settings `lorag kb tune` fitted on this base's judged queries (None = defaults).
    fusion: dict[str, Any] | None = None

    def to_metadata(self) -> dict[str, Any]:
        return {
            KB_MARKER: 1,
            "embedding_model": self.embedding_model,
            "embedding_fingerprint": self.embedding_fingerprint,
            "embedding_dim": self.embedding_dim,
            "chunk_size": self.chunk_size,
            "chunk_overlap": self.chunk_overlap,
            "splitter": self.splitter,
            "created_at": self.created_at,
            "description": self.description,
            "revision": self.revision,
            **({"fusion": json.dumps(self.fusion, sort_keys=True)} if self.fusion else {}),
        }

    @classmethod
    def from_metadata(cls, name: str, meta: dict[str, Any]) -> KBInfo:
        return cls(
            name=name,
            embedding_model=str(meta.get("embedding_model", "")),
            embedding_fingerprint=str(meta.get("embedding_fingerprint", "")),
            embedding_dim=int(meta.get("embedding_dim", 0)),
            chunk_size=int(meta.get("chunk_size", 0)),
            chunk_overlap=int(meta.get("chunk_overlap", 0)),
            splitter=str(meta.get("splitter", "sentence")),
            created_at=str(meta.get("created_at", "")),
            description=str(meta.get("description", "")),
            revision=int(meta.get("revision", 0)),
            fusion=_json_dict(meta.get("fusion")),
        )


def _json_dict(raw: Any) -> dict[str, Any] | None:
    """A JSON object kept as a string in collection metadata (Chroma holds scalars only)."""
    if not isinstance(raw, str) or not raw:
        return None
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


# ---------------------------------------------------------------------------- store


class ChromaStore:
    """One Chroma client (embedded + lock, or http) and the knowledge-base collections in it."""

    def __init__(self, settings: ChromaSettings, state_path: Path) -> None:
        self.settings = settings
        self.embedded = settings.mode == "embedded"
        self.location = (
            str(Path(settings.path).expanduser().resolve() if settings.path else state_path / "knowledge" / "chroma")
            if self.embedded
            else f"{'https' if settings.ssl else 'http'}://{settings.host}:{settings.port}"
        )
        self._lock: StoreLock | None = None
        self._collections: dict[str, Any] = {}
        self._guard = threading.Lock()
        self.client = self._open()

    def _open(self) -> Any:
        import chromadb
        from chromadb.config import Settings as ChromaClientSettings

        client_settings = ChromaClientSettings(anonymized_telemetry=False)
        if self.embedded:
            directory = Path(self.location)
            self._lock = StoreLock(directory)
            self._lock.acquire()
            try:
                return chromadb.PersistentClient(
                    path=str(directory),
                    settings=client_settings,
                    tenant=self.settings.tenant,
                    database=self.settings.database,
                )
            except Exception as err:
                self._lock.release()
                raise StoreUnavailable(f"cannot open the knowledge store at {directory}: {err}") from err
        try:
            client = chromadb.HttpClient(
                host=self.settings.host,
                port=self.settings.port,
                ssl=self.settings.ssl,
                headers=self.settings.headers or None,
                settings=client_settings,
                tenant=self.settings.tenant,
                database=self.settings.database,
            )
            client.heartbeat()
            return client
        except Exception as err:
            raise StoreUnavailable(
                f"cannot reach the Chroma server at {self.location}: {err}"
            ) from err

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.close()
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    # -- collections --------------------------------------------------------

    def _get(self, name: str) -> Any | None:
        from chromadb.errors import NotFoundError as ChromaNotFound

        try:
            return self.client.get_collection(name, embedding_function=None)
        except (ChromaNotFound, ValueError):
            return None

    def list_infos(self) -> list[KBInfo]:
        infos = []
        for collection in self.client.list_collections():
            meta = collection.metadata or {}
            if meta.get(KB_MARKER):
                infos.append(KBInfo.from_metadata(collection.name, meta))
        return sorted(infos, key=lambda info: info.name)

    def create(self, info: KBInfo, configuration: dict[str, Any] | None = None) -> None:
        """Both collections of a new base; `configuration` is the chunk collection's (HNSW)."""
        validate_kb_name(info.name)
        from chromadb.errors import ChromaError

        with self._guard:
            existing = self._get(info.name)
            if existing is not None:
                if (existing.metadata or {}).get(KB_MARKER):
                    raise KnowledgeBaseExists(f"knowledge base {info.name!r} already exists")
                raise KnowledgeBaseExists(
                    f"a Chroma collection named {info.name!r} exists and is not a lorag knowledge base"
                )
            try:
                manifest = self.client.get_or_create_collection(
                    MANIFEST_PREFIX + info.name, metadata={MANIFEST_MARKER: 1}, embedding_function=None
                )
                chunks = self.client.create_collection(
                    info.name,
                    metadata=info.to_metadata(),
                    configuration=configuration or {"hnsw": {"space": "cosine"}},
                    embedding_function=None,
                )
            except (ChromaError, ValueError) as err:
                raise InvalidName(f"Chroma refused knowledge base name {info.name!r}: {err}", param="name") from err
            self._collections[info.name] = (chunks, manifest)

    def drop(self, name: str) -> None:
        with self._guard:
            self.collections(name)  # raises when absent
            self._collections.pop(name, None)
            # Chunks first: a half-dropped base then has no chunks and an orphan manifest,
            # which `drop` removes when run again.
            with contextlib.suppress(Exception):
                self.client.delete_collection(name)
            with contextlib.suppress(Exception):
                self.client.delete_collection(MANIFEST_PREFIX + name)

    def collections(self, name: str, refresh: bool = False) -> tuple[Any, Any]:
        """(chunks, manifest) collections of a knowledge base."""
        cached = self._collections.get(name)
        if cached is not None and not refresh:
            return cached
        chunks = self._get(name)
        if chunks is None or not (chunks.metadata or {}).get(KB_MARKER):
            if chunks is None and self._get(MANIFEST_PREFIX + name) is not None:
                # A drop interrupted between its two deletes.
                with contextlib.suppress(Exception):
                    self.client.delete_collection(MANIFEST_PREFIX + name)
            raise KnowledgeBaseNotFound(f"no knowledge base named {name!r}", param="kb")
        manifest = self.client.get_or_create_collection(
            MANIFEST_PREFIX + name, metadata={MANIFEST_MARKER: 1}, embedding_function=None
        )
        self._collections[name] = (chunks, manifest)
        return chunks, manifest

    def info(self, name: str, refresh: bool = False) -> KBInfo:
        chunks, _ = self.collections(name, refresh=refresh)
        return KBInfo.from_metadata(name, chunks.metadata or {})

    def write_info(self, info: KBInfo) -> None:
        chunks, _ = self.collections(info.name)
        chunks.modify(metadata=info.to_metadata())  # modify replaces the whole dict

    def bump_revision(self, name: str) -> int:
        """Mark a change to the chunks so every process's keyword index rebuilds."""
        info = self.info(name, refresh=not self.embedded)
        info.revision += 1
        self.write_info(info)
        return info.revision
