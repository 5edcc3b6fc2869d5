"""Citation fields from llama-index metadata: what lorag calls page, section, title and source.

llama-index readers and parsers name them their own way (`page_label` from PDF readers,
`header_path` from the Markdown parser, `file_path` / `file_name` from SimpleDirectoryReader);
the reader hook, Document ingestion and the Chroma import all read them through here.
No llama-index import: the reader hook uses this for plugins' readers of any origin.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

_SOURCE_KEYS = ("source", "file_path", "url", "uri")
_TITLE_KEYS = ("title", "file_name")


def page_of(meta: Mapping[str, Any]) -> int | None:
    """`page`, else a numeric `page_label` (PDF readers); None when there is none."""
    for key in ("page", "page_label", "page_number"):
        value = meta.get(key)
        if isinstance(value, bool):
            continue
        if isinstance(value, int):
            return value
        if isinstance(value, str) and value.strip().isdigit():
            return int(value.strip())
    return None


def section_of(meta: Mapping[str, Any]) -> str | None:
    """`section`, else the Markdown parser's `header_path` ("/Setup/Linux/" -> "Setup > Linux")."""
    section = meta.get("section")
    if isinstance(section, str) and section.strip():
        return section.strip()
    path = meta.get("header_path")
    if isinstance(path, str):
        parts = [part.strip() for part in path.split("/") if part.strip()]
        return " > ".join(parts) or None
    return None


def title_of(meta: Mapping[str, Any]) -> str:
    return next((str(meta[key]) for key in _TITLE_KEYS if isinstance(meta.get(key), str) and meta[key].strip()), "")


def source_of(meta: Mapping[str, Any]) -> str | None:
    """Where a document came from, as its metadata says (a path or URL), or None."""
    return next((str(meta[key]) for key in _SOURCE_KEYS if isinstance(meta.get(key), str) and meta[key].strip()), None)
