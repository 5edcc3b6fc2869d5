"""Errors of the knowledge part; each is a LoragError so CLI and server report it plainly."""

from __future__ import annotations

from lorag.errors import ConflictError, LoragError, NotFoundError


class KnowledgeBaseNotFound(NotFoundError):
    code = "knowledge_base_not_found"


class DocumentNotFound(NotFoundError):
    code = "document_not_found"


class KnowledgeBaseExists(ConflictError):
    code = "knowledge_base_exists"


class EmbeddingModelMismatch(ConflictError):
    """A knowledge base is only ever embedded with the model it was built with."""

    code = "embedding_model_mismatch"


class StoreInUse(LoragError):
    """The embedded Chroma store is owned by another process (it is not process-safe)."""

    status_code = 423
    error_type = "conflict_error"
    code = "knowledge_store_in_use"


class StoreUnavailable(LoragError):
    """The Chroma server cannot be reached, or the store cannot be opened."""

    status_code = 503
    error_type = "server_error"
    code = "knowledge_store_unavailable"


class InvalidName(LoragError):
    code = "invalid_knowledge_base_name"


class PathNotAllowed(LoragError):
    status_code = 403
    error_type = "permission_error"
    code = "path_not_allowed"


class IngestInputError(LoragError):
    """A path, glob or upload that cannot be ingested at all (nothing is written)."""

    code = "invalid_ingest_input"


class PayloadTooLarge(LoragError):
    status_code = 413
    code = "payload_too_large"
