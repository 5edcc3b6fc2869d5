"""Per-key limits: messages per request, requests per minute and in flight, a token rate.

Several teams share one engine, so no key may take all of it. Two doors:
- `admission`, a dependency of the OpenAI routes, runs before the pipeline: a key
  already at its concurrency, or a body with too many messages, costs no
  tokenizing, retrieval or generation. Its slot is held until the response's
  last byte (FastAPI closes a yield dependency after the response, streams too).
- `admit`, called once a job exists (its prompt is tokenized), charges the key's
  token bucket with prompt + max_tokens and starts the generation deadline
  (lorag.server.deadline); when the answer is over, what retries and tool steps used
  beyond that is charged too.
The counts live in this process, or in Redis when replicas share them (lorag.server.shared_limits).
Keys are told apart by identity (Principal.key_id, from the key's hash), not by name.
Refusals are 429s in OpenAI's shape (code `rate_limit_exceeded`) with `Retry-After`.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, FastAPI, Request

from lorag.config import LimitsSettings
from lorag.errors import LoragError
from lorag.logging import get_logger
from lorag.server.auth import Principal, require_key
from lorag.server.deadline import Guard
from lorag.server.shared_limits import SharedCounts, SharedLimitsDown

log = get_logger("lorag.limits")
BURST_SECONDS = 10  # default bucket size: this many seconds of refill
RETRY_S = 1.0  # after Redis failed, how long replicas count alone before asking it again
LEASE_MARGIN_S = 60.0  # a shared slot's lease beyond the generation deadline
NO_DEADLINE_LEASE_S = 3600.0
LOCAL = object()  # Limiter._decide: count here


class RateLimited(LoragError):
    status_code = 429
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after_s: float, kind: str) -> None:
        super().__init__(message)
        self.error_type = kind  # OpenAI's types for 429s: "requests" or "tokens"
        self.retry_after_s = max(1, math.ceil(retry_after_s))
        self.headers = {"retry-after": str(self.retry_after_s)}


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


@dataclass
class Slot:
    """One admitted request's concurrency slot: counted here (member None) or in Redis."""

    key: str
    member: str | None = None


class Limiter:
    """The limits' state: per key (its identity, Principal.key_id), requests per minute, requests in
    flight and a token bucket. Keyed by identity, not display name: unnamed keys, or every
    `--api-key` key, would otherwise share one bucket.

    With `backend = "redis"` the counts live in Redis (lorag.server.shared_limits) and every replica
    shares them. While Redis cannot be reached, each replica counts here, against 1/`replicas`
    of every limit (never unlimited), and tries Redis again after RETRY_S.
    """

    def __init__(self, settings: LimitsSettings, shared: SharedCounts | None = None, processes: int = 1) -> None:
        self.settings = settings
        self.shared = shared
        self.processes = processes  # `--workers N` counting here: each enforces 1/N
        self.in_flight: dict[str, int] = {}  # this replica's requests in flight, for metrics and local slots
        self.windows: dict[str, deque[float]] = {}
        self.buckets: dict[str, TokenBucket] = {}
        self.names: dict[str, str] = {}  # key id -> display name, for metrics
        self._down = False
        self._retry_at = 0.0
        self._tasks: set[asyncio.Task[None]] = set()

    def check_messages(self, body: Any) -> None:
        limit = self.settings.max_messages
        messages = body.get("messages") if isinstance(body, dict) else None
        if limit and isinstance(messages, list) and len(messages) > limit:
            raise LoragError(f"Too many messages: {len(messages)}; at most {limit} per request "
                             "(server.limits.max_messages).", param="messages", code="too_many_messages")

    # -- the server's entry points: shared when configured, local otherwise ----------------

    async def enter(self, key: str) -> Slot:
        """Admission: one of the key's requests per minute, then one of its slots (429 otherwise)."""
        per_minute = self.settings.requests_per_min_per_key
        if per_minute:
            member = uuid.uuid4().hex
            waited = await self._decide(lambda shared: shared.request(key, per_minute, member))
            if waited is LOCAL:
                waited = self.count_request(key, self._local_count(per_minute), time.monotonic())
            if waited:
                log.info("rate_limited", key=key, limit="requests", per_minute=per_minute)
                raise RateLimited(f"Request rate limit for this API key: {per_minute} requests per minute "
                                  "(server.limits.requests_per_min_per_key).", retry_after_s=waited, kind="requests")
        limit = self.settings.max_concurrent_per_key
        if not limit:
            self.in_flight[key] = self.in_flight.get(key, 0) + 1
            return Slot(key)
        member = uuid.uuid4().hex
        taken = await self._decide(lambda shared: shared.acquire(key, limit, member, self._lease_s()))
        if taken is LOCAL:
            self.acquire(key, self._local_count(limit))
            return Slot(key)
        if not taken:
            self._refuse_slot(key, limit)
        self.in_flight[key] = self.in_flight.get(key, 0) + 1
        return Slot(key, member)

    def leave(self, slot: Slot) -> None:
        """Give a slot back (any thread of the event loop; Redis's part runs as a task)."""
        self.release(slot.key)
        if slot.member is not None and self.shared is not None:
            self._background(self.shared.release(slot.key, slot.member))

    async def spend(self, key: str, tokens: int) -> None:
        """Take `tokens` from `key`'s bucket, or refuse with a 429 saying when to retry."""
        rate = self.settings.tokens_per_s_per_key
        if not rate:
            return
        capacity = self.settings.token_burst_per_key or rate * BURST_SECONDS
        waited = await self._decide(lambda shared: shared.take(key, tokens, rate, capacity))
        if waited is LOCAL:
            waited = self.take_tokens(key, tokens, self._local(rate), self._local(capacity))
        if waited:
            log.info("rate_limited", key=key, limit="tokens", tokens=tokens, retry_after_s=round(waited, 2))
            raise RateLimited(f"Token rate limit for this API key: this request needs {tokens} tokens "
                              f"(prompt + max_tokens); {rate:g} tokens/s are allowed "
                              "(server.limits.tokens_per_s_per_key).", retry_after_s=waited, kind="tokens")

    def settle(self, key: str, reserved: int, used: int) -> None:
        """After the answer: what retries and tool steps used beyond the reservation is charged too
        (the bucket may go into debt); an answer that used less is not refunded (max_tokens was held)."""
        if used <= reserved:
            return
        bucket = self.buckets.get(key)
        if bucket is not None:
            bucket.level -= used - reserved
        if self.shared is not None and self.settings.tokens_per_s_per_key:
            self._background(self.shared.settle(key, used - reserved))
        log.info("tokens_settled", key=key, reserved=reserved, used=used)

    def deadline(self) -> float | None:
        timeout = self.settings.generation_timeout_s
        return time.monotonic() + timeout if timeout else None

    async def close(self) -> None:
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
        if self.shared is not None:
            await self.shared.close()

    # -- local counting: the memory backend, and the fallback while Redis is down -----------

    def acquire(self, key: str, limit: int | None = None) -> None:
        """Take one of `key`'s concurrency slots here, or refuse with a 429."""
        limit = self.settings.max_concurrent_per_key if limit is None else limit
        count = self.in_flight.get(key, 0)
        if limit and count >= limit:
            self._refuse_slot(key, limit)
        self.in_flight[key] = count + 1

    def release(self, key: str) -> None:
        count = self.in_flight.get(key, 0) - 1
        if count > 0:
            self.in_flight[key] = count
        else:
            self.in_flight.pop(key, None)

    def count_request(self, key: str, per_minute: int, now: float) -> float:
        """Admit one request into `key`'s last minute: 0, or the seconds until one would be admitted."""
        window = self.windows.setdefault(key, deque())
        while window and window[0] <= now - 60:
            window.popleft()
        if len(window) < per_minute:
            window.append(now)
            return 0.0
        return window[0] + 60 - now

    def take_tokens(self, key: str, tokens: int, rate: float, capacity: float) -> float:
        """Charge `key`'s local bucket: 0, or the seconds until it would let `tokens` pass."""
        now = time.monotonic()
        bucket = self.buckets.get(key)
        if bucket is None:
            bucket = self.buckets[key] = TokenBucket(rate, capacity, capacity, now)
        bucket.rate, bucket.capacity = rate, capacity  # the share changes when Redis goes or comes back
        return bucket.take(tokens, now)

    # -- helpers ------------------------------------------------------------------------------

    def _refuse_slot(self, key: str, limit: int) -> None:
        log.info("rate_limited", key=key, limit="concurrency", in_flight=self.in_flight.get(key, 0))
        raise RateLimited(f"Too many concurrent requests for this API key: {limit} are in flight "
                          "(server.limits.max_concurrent_per_key). Retry when one finishes.",
                          retry_after_s=1, kind="requests")

    def _share(self) -> int:
        """Into how many parts a limit counted here is split: 1/replicas while Redis is down,
        1/workers for `--workers N` counting in memory, else the whole of it."""
        return self.settings.replicas if self.shared is not None else self.processes

    def _local(self, budget: float) -> float:
        """A limit as this process enforces it alone."""
        return budget / self._share()

    def _local_count(self, budget: int) -> int:
        """The same for a count: at least 1, never 0 (0 would mean unlimited)."""
        return max(1, budget // self._share())

    def _lease_s(self) -> float:
        """How long a shared slot outlives a replica killed while holding it."""
        timeout = self.settings.generation_timeout_s
        return timeout + LEASE_MARGIN_S if timeout else NO_DEADLINE_LEASE_S

    async def _decide(self, work: Callable[[SharedCounts], Awaitable[Any]]) -> Any:
        """Redis's answer, or LOCAL: no shared backend, or Redis is down (the caller counts here)."""
        if self.shared is None or time.monotonic() < self._retry_at:
            return LOCAL
        try:
            answer = await work(self.shared)
        except SharedLimitsDown as err:
            self._retry_at = time.monotonic() + RETRY_S
            if not self._down:
                self._down = True
                log.warning("limits_backend_down", url=self.shared.url, error=str(err),
                            policy=f"each replica enforces 1/{self.settings.replicas} of every limit")
            return LOCAL
        if self._down:
            self._down = False
            log.info("limits_backend_back", url=self.shared.url)
        return answer

    def _background(self, work: Awaitable[None]) -> None:
        async def run() -> None:
            with contextlib.suppress(SharedLimitsDown):  # a slot's lease frees it; a lost debt is small
                await work

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def install(app: FastAPI) -> None:
    settings: LimitsSettings = app.state.settings.server.limits
    shared = SharedCounts(settings.redis_url, settings.redis_timeout_s) if settings.backend == "redis" else None
    app.state.limiter = Limiter(settings, shared, processes=app.state.settings.server.workers)


async def admission(request: Request, principal: Principal = Depends(require_key)) -> AsyncIterator[None]:
    """Router dependency: the body's message count, then the key's request rate and one of its
    concurrency slots, held until the response has been sent (or the client went away)."""
    limiter: Limiter = request.app.state.limiter
    if request.method == "POST" and request.headers.get("content-type", "").startswith("application/json"):
        try:
            body = await request.json()  # already parsed and cached by FastAPI: no second parse
        except ValueError:
            body = None  # the body's own validation answers this one
        limiter.check_messages(body)
    key = principal.limit_key
    limiter.names[key] = principal.name
    request.state.limit_slot = await limiter.enter(key)
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
    slot = getattr(request.state, "limit_slot", None)
    if slot is not None:
        request.state.limit_slot = None
        limiter: Limiter = request.app.state.limiter
        limiter.leave(slot)


async def admit(request: Request, job: Any) -> Guard:
    """Charge the key's token bucket for `job` (429 when empty) and start its deadline."""
    limiter: Limiter = request.app.state.limiter
    key = getattr(request.state, "limit_key", None) or "anonymous"
    reserved = job.reserved_tokens()
    await limiter.spend(key, reserved)

    def settle() -> None:
        limiter.settle(key, reserved, job.prompt_tokens + job.completion_tokens)

    return Guard(limiter.deadline(), limiter.settings.generation_timeout_s, settle)
