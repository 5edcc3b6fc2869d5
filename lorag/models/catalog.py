"""The imported models under `<state_dir>/models/`: list, show, remove, and resolve a name.

Why names: after `lorag models import smollm2.gguf`, a person should be able to write
`model.path = "smollm2"` (or `lorag serve --model smollm2`) instead of a folder path
(lorag.models.names resolves it).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from lorag.models.errors import ModelSourceNotFound
from lorag.models.names import imported_model_dir, resolve_model_path, state_models_dir
from lorag.models.record import ModelRecord, read_record


def list_models(models_dir: str | Path) -> list[ModelRecord]:
    """Every finished import, by name; staging and hidden folders are skipped."""
    root = Path(models_dir)
    if not root.is_dir():
        return []
    records = []
    for folder in sorted(root.iterdir()):
        if folder.name.startswith(".") or not folder.is_dir():
            continue
        record = read_record(folder)
        if record is not None:
            record.name = folder.name
            records.append(record)
    return records


def get_model(models_dir: str | Path, name: str) -> ModelRecord:
    """The record of `name`; ModelSourceNotFound (one line, with a hint) if it is not imported."""
    folder = imported_model_dir(models_dir, name)
    record = read_record(folder) if folder is not None else None
    if record is None:
        raise ModelSourceNotFound(f"no imported model named {name!r} in {models_dir} (see `lorag models list`)")
    record.name = name
    return record


def remove_model(models_dir: str | Path, name: str) -> ModelRecord:
    """Delete an imported model: renamed aside first, so a crash mid-delete leaves no half model."""
    record = get_model(models_dir, name)
    folder = Path(record.path)
    aside = Path(tempfile.mkdtemp(prefix=f".removing-{name}-", dir=folder.parent))
    os.rmdir(aside)
    os.rename(folder, aside)
    shutil.rmtree(aside, ignore_errors=True)
    return record


__all__ = ["get_model", "imported_model_dir", "list_models", "remove_model", "resolve_model_path",
           "state_models_dir"]
