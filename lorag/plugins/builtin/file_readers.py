"""lorag's own file readers (text, Markdown, HTML, PDF, DOCX, JSON, JSON Lines, CSV), registered
through `register_knowledge_readers` like any plugin's, so ingestion has one table of readers
and a plugin can replace one of these (a better PDF reader) by registering its extension."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lorag.knowledge.readers import BUILTIN_READERS
from lorag.plugins.hookspecs import hookimpl


@hookimpl
def register_knowledge_readers(register: Callable[[str, Any], None]) -> None:
    for suffix, reader in BUILTIN_READERS.items():
        register(suffix, reader)
