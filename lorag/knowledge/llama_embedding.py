"""lorag's embedding model as a llama-index `BaseEmbedding`.

A llama-index app (a `VectorStoreIndex`, say) that embeds with this gets exactly the vectors
a lorag knowledge base holds: documents through `encode_documents` (the document prefix, the
same batching), queries through `encode_query`. So its collections can be imported into lorag
without re-embedding (lorag.knowledge.llama_import), and the two answer the same.
"""

from __future__ import annotations

import asyncio
from typing import Any

from llama_index.core.base.embeddings.base import BaseEmbedding, Embedding
from pydantic import PrivateAttr

from lorag.knowledge.embeddings import Embedder, get_embedder
from lorag.knowledge.settings import EmbeddingSettings


class LoragEmbedding(BaseEmbedding):
    """`LoragEmbedding()` (the default model), `LoragEmbedding(settings=...)` or `LoragEmbedding(embedder=...)`."""

    _embedder: Embedder = PrivateAttr()

    def __init__(
        self, settings: EmbeddingSettings | None = None, *, embedder: Embedder | None = None, **kwargs: Any
    ) -> None:
        embedder = embedder or get_embedder(settings or EmbeddingSettings())
        kwargs.setdefault("embed_batch_size", embedder.settings.batch_size)
        super().__init__(model_name=embedder.name, **kwargs)
        self._embedder = embedder

    @classmethod
    def class_name(cls) -> str:
        return "LoragEmbedding"

    @property
    def embedder(self) -> Embedder:
        return self._embedder

    def _get_query_embedding(self, query: str) -> Embedding:
        vector: list[float] = self._embedder.encode_query(query).tolist()
        return vector

    def _get_text_embedding(self, text: str) -> Embedding:
        return self._get_text_embeddings([text])[0]

    def _get_text_embeddings(self, texts: list[str]) -> list[Embedding]:
        vectors: list[list[float]] = self._embedder.encode_documents(list(texts)).tolist()
        return vectors

    async def _aget_query_embedding(self, query: str) -> Embedding:
        return await asyncio.to_thread(self._get_query_embedding, query)

    async def _aget_text_embedding(self, text: str) -> Embedding:
        return await asyncio.to_thread(self._get_text_embedding, text)

    async def _aget_text_embeddings(self, texts: list[str]) -> list[Embedding]:
        return await asyncio.to_thread(self._get_text_embeddings, texts)
