"""Base models: fetch pinned model files, import GGUF files or HF folders, serve them by name.

Heavy libraries (torch, transformers, gguf, vLLM) are imported inside the functions
that need them, so importing this package (config.py does) costs nothing.
"""

from __future__ import annotations

from lorag.models.catalog import (
    get_model,
    list_models,
    remove_model,
    resolve_model_path,
    state_models_dir,
)
from lorag.models.check import check_model
from lorag.models.importer import import_model
from lorag.models.record import ModelRecord
from lorag.models.sources import SMOLLM2_135M_INSTRUCT, WheelFile, fetch_wheel_file

__all__ = [
    "SMOLLM2_135M_INSTRUCT",
    "ModelRecord",
    "WheelFile",
    "check_model",
    "fetch_wheel_file",
    "get_model",
    "import_model",
    "list_models",
    "remove_model",
    "resolve_model_path",
    "state_models_dir",
]
