"""Per-key limits: messages per request, requests in flight, a token rate, a generation deadline.

Several teams share one engine, so no key may take all of it. Two doors:
- `admission`, a dependency of the OpenAI routes, runs before the pipeline: a key
  already at its concurrency, or a body with too many messages, costs no
  tokenizing, retrieval or generation. Its slot is held until the response's
  last byte (FastAPI closes a yield dependency after the response, streams too).
- `admit`, called once a job exists (its prompt is tokenized), charges the key's
  token bucket with prompt + max_tokens and starts the generation deadline; when the
  answer is over, what retries and tool steps used beyond that is charged too.
Keys are told apart by identity (Principal.key_id, from the key's hash), not by name.
Refusals are 429s in OpenAI's shape (code `rate_limit_exceeded`) with `Retry-After`.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
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
    """The limits' state: per key (its identity, Principal.key_id), requests in flight and a
    token bucket. Keyed by identity, not display name: unnamed keys, or every `--api-key` key,
    would otherwise share one bucket."""

    def __init__(self, settings: LimitsSettings) -> None:
        self.settings = settings
        self.in_flight: dict[str, int] = {}
        self.buckets: dict[str, TokenBucket] = {}
        self.names: dict[str, str] = {}  # key id -> display name, for metrics

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

    def settle(self, key: str, reserved: int, used: int) -> None:
        """After the answer: what retries and tool steps used beyond the reservation is charged too
        (the bucket may go into debt); an answer that used less is not refunded (max_tokens was held)."""
        bucket = self.buckets.get(key)
        if bucket is not None and used > reserved:
            bucket.level -= used - reserved
            log.info("tokens_settled", key=key, reserved=reserved, used=used)

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
    key = principal.limit_key
    limiter.names[key] = principal.name
    limiter.acquire(key)
    request.state.limit_key = key
    try:
        yield
    finally:
        release_slot(request)
        job = getattr(request.state, "job", None)
        if job is not None:  # a stream that never started gives its adapter lease back here
            job.release()


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

    def __init__(self, deadline: float | None, timeout_s: float,
                 settle: Callable[[], None] | None = None) -> None:
        self.deadline = deadline
        self.timeout_s = timeout_s
        self.settle = settle or (lambda: None)  # runs once the answer is over, however it ended

    def _expired(self) -> GenerationTimeout:
        log.warning("generation_timeout", timeout_s=self.timeout_s)
        return GenerationTimeout(f"Generation took longer than {self.timeout_s:g} s "
                                 "(server.limits.generation_timeout_s) and was stopped.")

    async def run(self, work: Awaitable[T]) -> T:
        try:
            if self.deadline is None:
                return await work
            async with asyncio.timeout_at(_loop_time(self.deadline)):
                return await work
        except TimeoutError:
            raise self._expired() from None
        finally:
            self.settle()

    async def stream(self, chunks: AsyncIterator[T]) -> AsyncIterator[T]:
        """The deadline applies to each wait for the next chunk, never across a `yield`
        (a timeout there would cancel whoever consumes this generator)."""
        if self.deadline is None:
            try:
                async for chunk in chunks:
                    yield chunk
            finally:
                self.settle()
            return
        iterator = aiter(chunks)
        deadline = StreamDeadline(_loop_time(self.deadline))
        try:
            while True:
                try:
                    chunk = await deadline.next(iterator)
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    raise self._expired() from None
                yield chunk
        finally:
            deadline.stop()
            closer = getattr(iterator, "aclose", None)
            if closer is not None:
                await closer()
            self.settle()


class StreamDeadline:
    """One timer for a whole stream that cancels the task only while it waits for the next chunk.

    asyncio.timeout around each wait would do the same, but sets and cancels a timer per token:
    more than the rest of lorag's own work for a token on the fleet's streaming path.
    """

    def __init__(self, when: float) -> None:
        self.expired = False
        self._waiting: asyncio.Task[Any] | None = None  # the task inside next(), if any
        self._cancelled = False  # this deadline cancelled that task (and must take it back)
        self._timer = asyncio.get_running_loop().call_at(when, self._expire)

    def _expire(self) -> None:
        self.expired = True
        if self._waiting is not None:
            self._cancelled = True
            self._waiting.cancel()

    async def next(self, iterator: AsyncIterator[T]) -> T:
        """The iterator's next item; TimeoutError once the deadline passed (as asyncio.timeout)."""
        if self.expired:
            raise TimeoutError
        task = asyncio.current_task()
        assert task is not None
        before = task.cancelling()
        self._waiting = task
        try:
            return await anext(iterator)
        except asyncio.CancelledError:
            if self._cancelled and task.uncancel() <= before:
                raise TimeoutError from None
            raise
        finally:
            self._waiting = None
            if self._cancelled and task.cancelling() > before:  # it expired as the item came: take it back
                task.uncancel()
            self._cancelled = False

    def stop(self) -> None:
        self._timer.cancel()


def admit(request: Request, job: Any) -> Guard:
    """Charge the key's token bucket for `job` (429 when empty) and start its deadline."""
    limiter: Limiter = request.app.state.limiter
    key = getattr(request.state, "limit_key", None) or "anonymous"
    reserved = job.reserved_tokens()
    limiter.charge(key, reserved)

    def settle() -> None:
        limiter.settle(key, reserved, job.prompt_tokens + job.completion_tokens)

    return Guard(limiter.deadline(), limiter.settings.generation_timeout_s, settle)


def _loop_time(deadline: float) -> float:
    """A time.monotonic() deadline on the running loop's clock."""
    return asyncio.get_running_loop().time() + (deadline - time.monotonic())
