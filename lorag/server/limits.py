"""Per-key limits: messages per request, requests in flight, a token rate, a generation deadline.

Several teams share one engine, so no key may take all of it. Two doors:
- `admission`, a dependency of the OpenAI routes, runs before the pipeline: a key
  already at its concurrency, or a body with too many messages, costs no
  tokenizing, retrieval or generation. Its slot is held until the response's
  last byte (FastAPI closes a yield dependency after the response, streams too).
- `admit`, called once a job exists (its prompt is tokenized), charges the key's
  token bucket with prompt + max_tokens and starts the generation deadline.
Refusals are 429s in OpenAI's shape (code `rate_limit_exceeded`) with `Retry-After`.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import Depends, FastAPI, Request

from lorag.config import LimitsSettings
from lorag.errors import LoragError
from lorag.logging import get_logger
from lorag.server.auth import Principal, require_key

log = get_logger("lorag.limits")
T = TypeVar("T")
BURST_SECONDS = 10  # default bucket size: this many seconds of refill


class RateLimited(LoragError):
    status_code = 429
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after_s: float, kind: str) -> None:
        super().__init__(message)
        self.error_type = kind  # OpenAI's types for 429s: "requests" or "tokens"
        self.retry_after_s = max(1, math.ceil(retry_after_s))
        self.headers = {"retry-after": str(self.retry_after_s)}


class GenerationTimeout(LoragError):
    status_code = 504
    error_type = "server_error"
    code = "generation_timeout"


@dataclass
class TokenBucket:
    """`rate` tokens a second up to `capacity`. A request larger than the bucket passes when it
    is full and leaves it in debt, so a big request is slow to repeat rather than impossible."""

    rate: float
    capacity: float
    level: float
    updated: float

    def take(self, cost: float, now: float) -> float:
        """Charge `cost` and return 0, or charge nothing and return the seconds until it would pass."""
        self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
        self.updated = now
        need = min(cost, self.capacity)
        if self.level >= need:
            self.level -= cost
            return 0.0
        return (need - self.level) / self.rate


class Limiter:
    """The limits' state: per key name, requests in flight and a token bucket."""

    def __init__(self, settings: LimitsSettings) -> None:
        self.settings = settings
        self.in_flight: dict[str, int] = {}
        self.buckets: dict[str, TokenBucket] = {}

    def check_messages(self, body: Any) -> None:
        limit = self.settings.max_messages
        messages = body.get("messages") if isinstance(body, dict) else None
        if limit and isinstance(messages, list) and len(messages) > limit:
            raise LoragError(f"Too many messages: {len(messages)}; at most {limit} per request "
                             "(server.limits.max_messages).", param="messages", code="too_many_messages")

    def acquire(self, key: str) -> None:
        """Take one of `key`'s concurrency slots, or refuse with a 429."""
        limit = self.settings.max_concurrent_per_key
        count = self.in_flight.get(key, 0)
        if limit and count >= limit:
            log.info("rate_limited", key=key, limit="concurrency", in_flight=count)
            raise RateLimited(f"Too many concurrent requests for this API key: {limit} are in flight "
                              "(server.limits.max_concurrent_per_key). Retry when one finishes.",
                              retry_after_s=1, kind="requests")
        self.in_flight[key] = count + 1

    def release(self, key: str) -> None:
        count = self.in_flight.get(key, 0) - 1
        if count > 0:
            self.in_flight[key] = count
        else:
            self.in_flight.pop(key, None)

    def charge(self, key: str, tokens: int) -> None:
        """Take `tokens` from `key`'s bucket, or refuse with a 429 saying when to retry."""
        rate = self.settings.tokens_per_s_per_key
        if not rate:
            return
        now = time.monotonic()
        bucket = self.buckets.get(key)
        if bucket is None:
            capacity = self.settings.token_burst_per_key or rate * BURST_SECONDS
            bucket = self.buckets[key] = TokenBucket(rate, capacity, capacity, now)
        wait_s = bucket.take(tokens, now)
        if wait_s:
            log.info("rate_limited", key=key, limit="tokens", tokens=tokens, retry_after_s=round(wait_s, 2))
            raise RateLimited(f"Token rate limit for this API key: this request needs {tokens} tokens "
                              f"(prompt + max_tokens); {rate:g} tokens/s are allowed "
                              "(server.limits.tokens_per_s_per_key).", retry_after_s=wait_s, kind="tokens")

    def deadline(self) -> float | None:
        timeout = self.settings.generation_timeout_s
        return time.monotonic() + timeout if timeout else None


def install(app: FastAPI) -> None:
    app.state.limiter = Limiter(app.state.settings.server.limits)


async def admission(request: Request, principal: Principal = Depends(require_key)) -> AsyncIterator[None]:
    """Router dependency: the body's message count, then one of the key's concurrency slots,
    held until the response has been sent (or the client went away)."""
    limiter: Limiter = request.app.state.limiter
    if request.method == "POST" and request.headers.get("content-type", "").startswith("application/json"):
        try:
            body = await request.json()  # already parsed and cached by FastAPI: no second parse
        except ValueError:
            body = None  # the body's own validation answers this one
        limiter.check_messages(body)
    key = principal.name
    limiter.acquire(key)
    request.state.limit_key = key
    try:
        yield
    finally:
        release_slot(request)


def release_slot(request: Request) -> None:
    """Give the request's concurrency slot back, once. A stream gives it back right after its
    last event is written: FastAPI exits the dependency only later, and a client that read
    [DONE] and sent its next request at once would meet its own finished stream's slot."""
    key = getattr(request.state, "limit_key", None)
    if key is not None:
        request.state.limit_key = None
        limiter: Limiter = request.app.state.limiter
        limiter.release(key)


class Guard:
    """The generation deadline of one job, for a streamed or a non-streamed answer.

    Past it the engine request is aborted (cancelling the work closes the engine's
    stream, which aborts it) and the client gets a 504, or an error event in a stream.
    """

    def __init__(self, deadline: float | None, timeout_s: float) -> None:
        self.deadline = deadline
        self.timeout_s = timeout_s

    def _expired(self) -> GenerationTimeout:
        log.warning("generation_timeout", timeout_s=self.timeout_s)
        return GenerationTimeout(f"Generation took longer than {self.timeout_s:g} s "
                                 "(server.limits.generation_timeout_s) and was stopped.")

    async def run(self, work: Awaitable[T]) -> T:
        if self.deadline is None:
            return await work
        try:
            async with asyncio.timeout_at(_loop_time(self.deadline)):
                return await work
        except TimeoutError:
            raise self._expired() from None

    async def stream(self, chunks: AsyncIterator[T]) -> AsyncIterator[T]:
        """The deadline applies to each wait for the next chunk, never across a `yield`
        (a timeout there would cancel whoever consumes this generator)."""
        if self.deadline is None:
            async for chunk in chunks:
                yield chunk
            return
        iterator = aiter(chunks)
        try:
            while True:
                try:
                    async with asyncio.timeout_at(_loop_time(self.deadline)):
                        chunk = await anext(iterator)
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    raise self._expired() from None
                yield chunk
        finally:
            closer = getattr(iterator, "aclose", None)
            if closer is not None:
                await closer()


def admit(request: Request, job: Any) -> Guard:
    """Charge the key's token bucket for `job` (429 when empty) and start its deadline."""
    limiter: Limiter = request.app.state.limiter
    key = getattr(request.state, "limit_key", None) or "anonymous"
    max_tokens = getattr(job.params, "max_tokens", None) or 0
    limiter.charge(key, job.prompt_tokens + max_tokens * job.n * len(job.prompts))
    return Guard(limiter.deadline(), limiter.settings.generation_timeout_s)


def _loop_time(deadline: float) -> float:
    """A time.monotonic() deadline on the running loop's clock."""
    return asyncio.get_running_loop().time() + (deadline - time.monotonic())
