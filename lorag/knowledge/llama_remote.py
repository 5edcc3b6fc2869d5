"""A lorag server's `POST /v1/knowledge/{kb}/query`, for the llama-index retriever.

Apps that do not own the knowledge store (it is locked by the server, or lives elsewhere)
search through the server with an API key; every failure, from a refused key to an unreachable
host, becomes one RemoteKnowledgeError with a readable message.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import httpx

from lorag.errors import LoragError
from lorag.logging import get_logger

log = get_logger("lorag.knowledge.llama_remote")


class RemoteKnowledgeError(LoragError):
    """The lorag server refused a knowledge query, or could not be reached."""

    error_type = "server_error"
    code = "remote_knowledge_error"

    def __init__(self, message: str, *, status_code: int = 502, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.status_code = status_code


class RemoteSearch:
    """Knowledge queries over HTTP: a sync client for `search`, an async one per `asearch`."""

    def __init__(self, base_url: str, api_key: str, *, timeout_s: float = 60.0, **client_options: Any) -> None:
        self.base_url = base_url.rstrip("/").removesuffix("/v1")
        self.headers = {"authorization": f"Bearer {api_key}"}
        self.timeout_s = timeout_s
        self.client_options = client_options
        self._client: httpx.Client | None = None

    def _path(self, kbs: list[str]) -> str:
        return f"/v1/knowledge/{quote(','.join(kbs), safe=',')}/query"

    def search(self, kbs: list[str], body: dict[str, Any]) -> list[dict[str, Any]]:
        if self._client is None:
            self._client = httpx.Client(
                base_url=self.base_url, headers=self.headers, timeout=self.timeout_s, **self.client_options
            )
        try:
            response = self._client.post(self._path(kbs), json=body)
        except httpx.HTTPError as err:
            raise self._unreachable(err) from None
        return self._hits(response)

    async def asearch(self, kbs: list[str], body: dict[str, Any]) -> list[dict[str, Any]]:
        async with httpx.AsyncClient(
            base_url=self.base_url, headers=self.headers, timeout=self.timeout_s, **self.client_options
        ) as client:
            try:
                response = await client.post(self._path(kbs), json=body)
            except httpx.HTTPError as err:
                raise self._unreachable(err) from None
        return self._hits(response)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def _unreachable(self, err: httpx.HTTPError) -> RemoteKnowledgeError:
        log.warning("kb.remote.unreachable", url=self.base_url, error=str(err))
        return RemoteKnowledgeError(f"cannot reach lorag at {self.base_url}: {type(err).__name__}: {err}")

    def _hits(self, response: httpx.Response) -> list[dict[str, Any]]:
        if response.status_code >= 400:
            message, code = _error_of(response)
            log.warning("kb.remote.refused", url=self.base_url, status=response.status_code, code=code)
            raise RemoteKnowledgeError(
                f"lorag at {self.base_url} answered {response.status_code}: {message}",
                status_code=response.status_code,
                code=code,
            )
        try:
            hits = response.json()["hits"]
        except (ValueError, KeyError, TypeError):
            raise RemoteKnowledgeError(
                f"lorag at {self.base_url} answered something that is not a knowledge query result"
            ) from None
        if not isinstance(hits, list):
            raise RemoteKnowledgeError(f"lorag at {self.base_url} answered hits that are not a list")
        return hits


def _error_of(response: httpx.Response) -> tuple[str, str | None]:
    """The message of lorag's OpenAI-shaped error (or FastAPI's validation detail), on one line."""
    try:
        body = response.json()
    except ValueError:
        return " ".join(response.text.split())[:300] or response.reason_phrase, None
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and error.get("message"):
        return " ".join(str(error["message"]).split()), error.get("code")
    detail = body.get("detail") if isinstance(body, dict) else None
    if isinstance(detail, list):
        parts = [f"{'.'.join(str(p) for p in d.get('loc', [])[1:])}: {d.get('msg')}" for d in detail if isinstance(d, dict)]
        return "; ".join(parts) or str(detail), None
    return " ".join(str(detail or body).split())[:300], None
