"""`[stored_completions]`: how long what `store: true` keeps lives, and whether storing is allowed at all."""

from __future__ import annotations

from pydantic import Field

from lorag.schema import Strict

MAX_METADATA_KEYS = 16
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 512


class StoredCompletionsSettings(Strict):
    """Stored completions are the loop's raw material (docs/loop.md); a domain may set its own defaults."""

    enabled: bool = Field(default=True, description="Off: `store: true` is refused with a 400, nothing is kept.")
    retention_days: int = Field(default=30, ge=1, le=3650,
                                description="A stored completion is deleted this long after it was made.")


def check_metadata(value: dict[str, str] | None) -> dict[str, str] | None:
    """OpenAI's metadata limits: 16 string pairs, keys up to 64 characters, values up to 512 (ValueError)."""
    if value is None:
        return None
    if len(value) > MAX_METADATA_KEYS:
        raise ValueError(f"at most {MAX_METADATA_KEYS} keys")
    for key, item in value.items():
        if not isinstance(key, str) or not isinstance(item, str):
            raise ValueError("keys and values must be strings")
        if len(key) > MAX_METADATA_KEY or len(item) > MAX_METADATA_VALUE:
            raise ValueError(f"keys up to {MAX_METADATA_KEY} characters, values up to {MAX_METADATA_VALUE}")
    return value
