"""Small pieces every part's stored and configured data shares: strict models, timestamps."""

from __future__ import annotations

from datetime import UTC, datetime

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    """A settings table: unknown keys are errors (a typo must not be ignored), values re-checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def now_iso() -> str:
    """Now, in UTC, to the second, as stored in manifests, key stores and knowledge-base records."""
    return datetime.now(UTC).isoformat(timespec="seconds")
