"""lorag's retrieval as a llama-index `BaseRetriever`.

lorag searches (vector, BM25 keyword, hybrid fusion, reranking, filters) and llama-index
builds the rest of the app (query engines, chat engines, fusion retrievers) on top. Two ways
in: in-process over a KnowledgeService (`LoragRetriever.local` / `.from_config`), or through a
running server's `POST /v1/knowledge/{kb}/query` with an API key (`LoragRetriever.remote`).
Every node is a `TextNode` whose id is lorag's chunk id and whose metadata is the hit's citation
(kb, source, location, title, page, section, ...), so `response.source_nodes` cite like lorag.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Protocol

from llama_index.core.retrievers import BaseRetriever
from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode

from lorag.knowledge.search import KnowledgeSearch
from lorag.logging import get_logger

log = get_logger("lorag.knowledge.llama_retriever")

# What the language model sees of a hit's metadata in llama-index prompts; the rest is for citations.
LLM_METADATA = ("source", "title", "location")


class Search(Protocol):
    """Where hits come from: a knowledge service here, or a lorag server (llama_remote.RemoteSearch)."""

    def search(self, kbs: list[str], body: dict[str, Any]) -> list[dict[str, Any]]: ...

    async def asearch(self, kbs: list[str], body: dict[str, Any]) -> list[dict[str, Any]]: ...

    def close(self) -> None: ...


class LocalSearch:
    """KnowledgeSearch.query in this process; `owned` services are closed with the retriever."""

    def __init__(self, service: KnowledgeSearch, owned: bool = False) -> None:
        self.service = service
        self.owned = owned

    def search(self, kbs: list[str], body: dict[str, Any]) -> list[dict[str, Any]]:
        options = {key: value for key, value in body.items() if key != "query"}
        return [hit.to_dict() for hit in self.service.query(kbs, body["query"], **options)]

    async def asearch(self, kbs: list[str], body: dict[str, Any]) -> list[dict[str, Any]]:
        # Embedding and Chroma block: off the event loop, like the server's handlers.
        return await asyncio.to_thread(self.search, kbs, body)

    def close(self) -> None:
        close = getattr(self.service, "close", None)
        if self.owned and close is not None:
            close()


def node_from_hit(hit: dict[str, Any]) -> NodeWithScore:
    """A hit (Hit.to_dict(), or one hit of the HTTP answer) as a scored TextNode with its citation."""
    metadata = dict(hit.get("metadata") or {})
    for key in ("kb", "source", "location"):
        metadata.setdefault(key, hit.get(key, ""))
    chunk_id = str(metadata.get("chunk_id") or "")
    node = TextNode(
        id_=chunk_id or None,
        text=str(hit.get("text", "")),
        metadata=metadata,
        excluded_llm_metadata_keys=[key for key in metadata if key not in LLM_METADATA],
        excluded_embed_metadata_keys=list(metadata),
    )
    return NodeWithScore(node=node, score=float(hit.get("score", 0.0)))


class LoragRetriever(BaseRetriever):
    """Top-k chunks of one or more knowledge bases; the options are those of `lorag kb query`."""

    def __init__(
        self,
        search: Search,
        kb: str | list[str],
        *,
        top_k: int | None = None,
        mode: str | None = None,
        filters: dict[str, Any] | None = None,
        score_threshold: float | None = None,
        rerank: bool | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.backend = search
        self.kbs = [kb] if isinstance(kb, str) else list(kb)
        self.options: dict[str, Any] = {
            "top_k": top_k, "mode": mode, "filters": filters, "score_threshold": score_threshold, "rerank": rerank,
        }

    @classmethod
    def local(cls, service: KnowledgeSearch, kb: str | list[str], **options: Any) -> LoragRetriever:
        """Over a KnowledgeService this process already has (its owner closes it)."""
        return cls(LocalSearch(service), kb, **options)

    @classmethod
    def from_config(
        cls, kb: str | list[str], config: str | Path | None = None, *, state_dir: str | Path | None = None,
        **options: Any,
    ) -> LoragRetriever:
        """Over the knowledge store of a lorag.toml (or lorag's default config) and/or a state
        directory; the retriever owns that service: call `close()` (or use `with`) when done."""
        from lorag.config import load_settings
        from lorag.knowledge.service import KnowledgeService

        overrides = {"state_dir": str(state_dir)} if state_dir is not None else None
        settings = load_settings(Path(config) if config is not None else None, overrides)
        return cls(LocalSearch(KnowledgeService.from_settings(settings), owned=True), kb, **options)

    @classmethod
    def remote(
        cls, base_url: str, api_key: str, kb: str | list[str], *, timeout_s: float = 60.0, **options: Any
    ) -> LoragRetriever:
        """Through a lorag server (`http://host:port`, with or without `/v1`) and a key that may
        query knowledge bases (an admin key, or one created with the knowledge scope)."""
        from lorag.knowledge.llama_remote import RemoteSearch

        return cls(RemoteSearch(base_url, api_key, timeout_s=timeout_s), kb, **options)

    def _body(self, query: QueryBundle) -> dict[str, Any]:
        return {"query": query.query_str, **{k: v for k, v in self.options.items() if v is not None}}

    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        hits = self.backend.search(self.kbs, self._body(query_bundle))
        log.debug("kb.llama.retrieve", kbs=self.kbs, hits=len(hits))
        return [node_from_hit(hit) for hit in hits]

    async def _aretrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        hits = await self.backend.asearch(self.kbs, self._body(query_bundle))
        return [node_from_hit(hit) for hit in hits]

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> LoragRetriever:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
