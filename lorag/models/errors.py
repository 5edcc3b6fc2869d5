"""What can go wrong with a model, each as one line a person can act on.

All are LoragErrors, so the CLI prints them as `error: ...` and exits non-zero.
"""

from __future__ import annotations

from lorag.errors import ConflictError, LoragError, NotFoundError


class ModelError(LoragError):
    """Base for model import, fetch and check problems."""

    code = "model_error"


class ModelSourceNotFound(ModelError, NotFoundError):
    """The file, folder, imported name or HF id does not exist here."""

    code = "model_not_found"


class CorruptModelFile(ModelError):
    """Not a model we can read: wrong magic, truncated, unreadable weights or config."""

    code = "corrupt_model"


class UnsupportedArchitecture(ModelError):
    """vLLM cannot serve this architecture, so importing or starting it would be wasted time."""

    code = "unsupported_architecture"


class MissingTokenizer(ModelError):
    """A model without a tokenizer cannot turn requests into tokens."""

    code = "missing_tokenizer"


class NotEnoughDiskSpace(ModelError):
    """The output would not fit; refused before writing (or after ENOSPC, cleaned up)."""

    status_code = 507
    code = "not_enough_disk_space"


class ModelExists(ModelError, ConflictError):
    """An imported model of that name is there already (use --force to replace it)."""

    code = "model_exists"


class FetchError(ModelError):
    """Downloading a pinned model file failed (no network, pip failure)."""

    code = "fetch_failed"


class HashMismatch(ModelError):
    """A downloaded or extracted file is not the one pinned: never use it."""

    code = "hash_mismatch"
