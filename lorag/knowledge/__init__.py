"""Knowledge bases: ingestion with llama-index, Chroma storage, hybrid retrieval, citations.

`Hit` and `KnowledgeService` are imported lazily: lorag.config imports
this package for its settings, and must not pay for chromadb or torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Hit", "KnowledgeService"]


def __getattr__(name: str) -> Any:
    if name == "Hit":
        from lorag.knowledge import retrieval as module

        return getattr(module, name)
    if name == "KnowledgeService":
        from lorag.knowledge.service import KnowledgeService

        return KnowledgeService
    raise AttributeError(name)
