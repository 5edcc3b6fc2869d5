"""Serving an imported model by name: where `<state_dir>/models/NAME` is, and whether it counts.

The settings layer resolves `model.path = "NAME"` with this module alone (no weights, no
torch), so it sits at the bottom of the house with lorag.config (docs/architecture.md).
A name only counts when the folder carries a provenance record, so a stray folder or an
unfinished import is never mistaken for a model.
"""

from __future__ import annotations

import re
from pathlib import Path

MODELS_SUBDIR = "models"
RECORD_FILE = "lorag-model.json"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def state_models_dir(state_dir: str | Path) -> Path:
    """Where imported models live for a state directory."""
    return Path(state_dir).expanduser().resolve() / MODELS_SUBDIR


def imported_model_dir(models_dir: str | Path, name: str) -> Path | None:
    """The folder of the imported model `name`, or None if there is none."""
    if not NAME_RE.match(name):
        return None
    folder = Path(models_dir) / name
    return folder.resolve() if (folder / RECORD_FILE).is_file() else None


def resolve_model_path(value: str, state_dir: str | Path) -> str:
    """An imported model's absolute folder when `value` names one; otherwise `value` unchanged."""
    folder = imported_model_dir(state_models_dir(state_dir), value) if value else None
    return str(folder) if folder is not None else value
