"""HTTP to one vLLM OpenAI server: health, models, adapter load/unload, streamed completions.

Every failure is a ServerError saying whether the request may be retried elsewhere: a
connection that could not be made, or a 5xx before any output, loses nothing by moving on.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from typing import Any

import httpx

from lorag.fleet.settings import FleetServer


class ServerError(Exception):
    """A server did not do what was asked; `status` is its HTTP status (0: no answer at all)."""

    def __init__(self, server: str, message: str, status: int = 0) -> None:
        super().__init__(f"{server}: {message}")
        self.server = server
        self.status = status

    @property
    def server_fault(self) -> bool:
        """No answer, or a 5xx: the server's fault, not the request's (a 4xx is the request's)."""
        return self.status == 0 or self.status >= 500


class ServerClient:
    def __init__(self, server: FleetServer, connect_timeout_s: float) -> None:
        self.server = server
        key = server.key()
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        # No read timeout on streams (a long answer is not a failure); the engine's deadline bounds them.
        timeout = httpx.Timeout(None, connect=connect_timeout_s)
        self.http = httpx.AsyncClient(base_url=server.url, headers=headers, timeout=timeout,
                                      limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))

    @property
    def name(self) -> str:
        return self.server.label

    async def close(self) -> None:
        await self.http.aclose()

    async def _call(self, method: str, path: str, timeout: float, **kwargs: Any) -> httpx.Response:
        try:
            response = await self.http.request(method, path, timeout=timeout, **kwargs)
        except httpx.HTTPError as err:
            raise ServerError(self.name, f"{method} {path}: {type(err).__name__}: {err}".rstrip(": ")) from None
        if response.status_code >= 400:
            raise ServerError(self.name, f"{method} {path}: HTTP {response.status_code}: {_message(response)}",
                              response.status_code)
        return response

    async def health(self, timeout: float) -> None:
        await self._call("GET", "/health", timeout)

    async def models(self, timeout: float) -> list[dict[str, Any]]:
        response = await self._call("GET", "/v1/models", timeout)
        data: list[dict[str, Any]] = response.json().get("data", [])
        return data

    async def load_adapter(self, name: str, path: str, timeout: float) -> None:
        await self._call("POST", "/v1/load_lora_adapter", timeout,
                         json={"lora_name": name, "lora_path": self.server.server_path(path)})

    async def unload_adapter(self, name: str, timeout: float) -> None:
        await self._call("POST", "/v1/unload_lora_adapter", timeout, json={"lora_name": name})

    async def stream_completion(self, body: dict[str, Any]) -> AsyncGenerator[dict[str, Any], None]:
        """The server-sent chunks of a streamed /v1/completions, as dicts; an error event raises."""
        try:
            async with self.http.stream("POST", "/v1/completions", json=body) as response:
                if response.status_code >= 400:
                    await response.aread()
                    raise ServerError(self.name, f"HTTP {response.status_code}: {_message(response)}",
                                      response.status_code)
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return
                    chunk = json.loads(data)
                    if "error" in chunk and "choices" not in chunk:
                        error = chunk["error"]
                        raise ServerError(self.name, str(error.get("message", error)), int(error.get("code") or 500))
                    yield chunk
        except httpx.HTTPError as err:
            raise ServerError(self.name, f"{type(err).__name__}: {err}".rstrip(": ")) from None


def _message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200]
    error = body.get("error", body) if isinstance(body, dict) else body
    return str(error.get("message", error) if isinstance(error, dict) else error)[:300]
