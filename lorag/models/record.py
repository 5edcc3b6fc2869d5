"""The provenance record every imported model carries: `lorag-model.json`.

Why: a folder of weights says nothing about where it came from. The record keeps
the source and its hash (to tell whether two imports are the same model), the
licence (to know whether it may be served), and what the importer did (dtype,
architecture, parameter count, lorag version), so `lorag models show` can answer
without loading anything.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lorag.models.names import RECORD_FILE

__all__ = ["RECORD_FILE", "ModelRecord", "read_record"]


@dataclass
class ModelRecord:
    """One imported model: its folder and how it was made."""

    name: str
    path: str
    source: str
    source_kind: str  # "gguf" | "hf"
    source_sha256: str
    license: str | None
    parameters: int
    dtype: str
    architecture: str
    imported_at: str
    lorag_version: str
    chat_template: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any], path: Path) -> ModelRecord:
        """Read a record, tolerating unknown keys (a newer lorag may add some)."""
        known = {f for f in cls.__dataclass_fields__}
        values = {k: v for k, v in data.items() if k in known}
        values["path"] = str(path)
        return cls(**values)


def write_record(folder: Path, record: ModelRecord) -> None:
    """Write the record into `folder`; the path is stored as the final one, not the staging one."""
    (folder / RECORD_FILE).write_text(json.dumps(record.to_json(), indent=2) + "\n", encoding="utf-8")


def read_record(folder: Path) -> ModelRecord | None:
    """The folder's record, or None where there is none or it cannot be read."""
    try:
        data = json.loads((folder / RECORD_FILE).read_text(encoding="utf-8"))
        return ModelRecord.from_json(data, folder.resolve())
    except (OSError, ValueError, TypeError):
        return None
