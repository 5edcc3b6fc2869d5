"""HTTP to one vLLM OpenAI server: health, models, adapter load/unload, streamed completions.

Every failure is a ServerError saying whether the request may be retried elsewhere: a
connection that could not be made, or a 5xx before any output, loses nothing by moving on.
A pooled connection the server had already closed is not a failure: the request goes again on
a new connection (`_send`).

aiohttp rather than httpx: every token of every answer passes through here, and in a profile
of lorag under load httpx's layered stream reading was the largest part of lorag's own CPU per
token (benchmarks/fleet.py prints lorag's CPU per 1k tokens).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator
from typing import Any

import aiohttp
import orjson

from lorag.fleet.settings import FleetServer
from lorag.logging import get_logger

log = get_logger("lorag.fleet")

ERRORS = (aiohttp.ClientError, TimeoutError)


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
    def __init__(self, server: FleetServer, connect_timeout_s: float, keepalive_s: float = 4.0) -> None:
        self.server = server
        key = server.key()
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.base_url = server.url.rstrip("/")  # joined by hand: a path prefix (…/vllm) is kept
        self.connect_timeout_s = connect_timeout_s
        self.keepalive_s = keepalive_s
        self._session: aiohttp.ClientSession | None = None
        self._fresh: aiohttp.ClientSession | None = None

    @property
    def name(self) -> str:
        return self.server.label

    @property
    def session(self) -> aiohttp.ClientSession:
        """Made on first use, inside the event loop that will use it (aiohttp binds to one loop).
        Idle connections are dropped after `keepalive_s`, before the server drops them."""
        if self._session is None or self._session.closed:
            self._session = self._new_session(aiohttp.TCPConnector(limit=0, keepalive_timeout=self.keepalive_s))
        return self._session

    @property
    def fresh(self) -> aiohttp.ClientSession:
        """A new connection for every request: the retry after a pooled one turned out closed."""
        if self._fresh is None or self._fresh.closed:
            self._fresh = self._new_session(aiohttp.TCPConnector(limit=0, force_close=True))
        return self._fresh

    def _new_session(self, connector: aiohttp.TCPConnector) -> aiohttp.ClientSession:
        # No read timeout on streams (a long answer is not a failure); the engine's deadline bounds them.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.connect_timeout_s)
        return aiohttp.ClientSession(headers=self.headers, timeout=timeout, connector=connector)

    async def close(self) -> None:
        for session in (self._session, self._fresh):
            if session is not None:
                await session.close()

    async def _send(self, method: str, path: str, **kwargs: Any) -> aiohttp.ClientResponse:
        """The response (its headers read) to one request.

        A pooled keep-alive connection may have been closed by the server a moment before lorag
        wrote to it (its idle timeout): the write fails or the server hangs up before any byte
        of a response. That is the connection's fault, not the server's: the request is sent
        once more, on a new connection, before anyone is told the server failed.
        """
        url = self.base_url + path
        try:
            return await self.session.request(method, url, **kwargs)
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as err:
            if isinstance(err, aiohttp.ClientConnectorError):  # no connection at all: the server is away
                raise
            log.info("stale_connection_retried", server=self.name, path=path, error=_describe(err))
            return await self.fresh.request(method, url, **kwargs)

    async def _call(self, method: str, path: str, timeout: float, **kwargs: Any) -> Any:
        """The JSON of a short call (None for an empty body)."""
        try:
            async with await self._send(method, path, timeout=aiohttp.ClientTimeout(total=timeout),
                                        **kwargs) as response:
                text = await response.text()
        except ERRORS as err:
            raise ServerError(self.name, f"{method} {path}: {_describe(err)}") from None
        if response.status >= 400:
            raise ServerError(self.name, f"{method} {path}: HTTP {response.status}: {_message(text)}",
                              response.status)
        try:
            return json.loads(text) if text.strip() else None
        except ValueError:
            return text

    async def health(self, timeout: float) -> None:
        await self._call("GET", "/health", timeout)

    async def models(self, timeout: float) -> list[dict[str, Any]]:
        body = await self._call("GET", "/v1/models", timeout)
        data: list[dict[str, Any]] = body.get("data", []) if isinstance(body, dict) else []
        return data

    async def load_adapter(self, name: str, path: str, timeout: float) -> None:
        await self._call("POST", "/v1/load_lora_adapter", timeout,
                         json={"lora_name": name, "lora_path": self.server.server_path(path)})

    async def unload_adapter(self, name: str, timeout: float) -> None:
        await self._call("POST", "/v1/unload_lora_adapter", timeout, json={"lora_name": name})

    async def stream_completion(self, body: dict[str, Any]) -> AsyncGenerator[dict[str, Any], None]:
        """The server-sent chunks of a streamed /v1/completions, as dicts; an error event raises.

        Leaving early (the client went away) closes the connection, and the server aborts the
        request; a stream read to its end returns the connection to the pool.
        """
        try:
            async with await self._send("POST", "/v1/completions", json=body) as response:
                if response.status >= 400:
                    raise ServerError(self.name, f"HTTP {response.status}: {_message(await response.text())}",
                                      response.status)
                pending = b""
                async for data in response.content.iter_any():
                    pending += data
                    *lines, pending = pending.split(b"\n")
                    for line in lines:
                        chunk = _event(line)
                        if chunk is not None:
                            yield self._checked(chunk)
                            # iter_any hands over all that is buffered without suspending: without this
                            # a backlog (lorag behind under load) runs to its end before a cancel (the
                            # client went away) can land, and the server generates on for nobody.
                            await asyncio.sleep(0)
                chunk = _event(pending)
                if chunk is not None:
                    yield self._checked(chunk)
        except ERRORS as err:
            raise ServerError(self.name, _describe(err)) from None

    def _checked(self, chunk: dict[str, Any]) -> dict[str, Any]:
        if "error" in chunk and "choices" not in chunk:
            error = chunk["error"]
            raise ServerError(self.name, str(error.get("message", error)), int(error.get("code") or 500))
        return chunk


def _event(line: bytes) -> dict[str, Any] | None:
    """The JSON of one `data:` line of a server-sent event stream (None for anything else)."""
    if not line.startswith(b"data:"):
        return None
    data = line[5:].strip()
    if data == b"[DONE]":
        return None
    return _loads(data)


def _loads(data: bytes) -> Any:
    """orjson (every token's chunk passes here); the standard library for what it refuses
    (non-standard NaN/Infinity, lone surrogate escapes), which Python's own servers may write."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)


def _describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}".rstrip(": ")


def _message(text: str) -> str:
    try:
        body = json.loads(text)
    except ValueError:
        return text[:200]
    error = body.get("error", body) if isinstance(body, dict) else body
    return str(error.get("message", error) if isinstance(error, dict) else error)[:300]
