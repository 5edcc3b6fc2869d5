"""Limits shared by lorag replicas through a real Redis server (lorag.server.shared_limits).

Three real lorag apps (the echo engine: limits need no generation) share one Redis: a key's
requests per minute are counted once whichever replica it calls; concurrency and tokens are too.
With Redis stopped, each replica enforces 1/replicas of every limit (never unlimited), and goes
back to the shared counts once Redis answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from structlog.testing import capture_logs

from lorag.config import LimitsSettings
from lorag.server.limits import RETRY_S, Limiter, RateLimited
from lorag.server.shared_limits import SharedCounts
from tests.echo_server import USER_KEY, echo_server, echo_settings
from tests.redis_server import RedisServer

pytestmark = pytest.mark.timeout(600)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis").start()
    try:
        yield server
    finally:
        server.stop()


def shared_limits(redis_server: RedisServer, **limits: object) -> LimitsSettings:
    return LimitsSettings.model_validate({"backend": "redis", "redis_url": redis_server.url, "replicas": 3, **limits})


def limiter(redis_server: RedisServer, **limits: object) -> Limiter:
    settings = shared_limits(redis_server, **limits)
    return Limiter(settings, SharedCounts(settings.redis_url, settings.redis_timeout_s))


def chat(http: httpx.Client) -> int:
    body = {"model": "echo-base", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
    return http.post("/v1/chat/completions", json=body, headers={"authorization": f"Bearer {USER_KEY}"}).status_code


def test_a_request_rate_sent_round_robin_over_three_replicas_is_admitted_once(tmp_path: Path,
                                                                               redis_server: RedisServer) -> None:
    per_minute = 4
    limits = shared_limits(redis_server, requests_per_min_per_key=per_minute).model_dump()
    with contextlib.ExitStack() as stack:
        replicas = [stack.enter_context(echo_server(echo_settings(tmp_path / f"replica-{i}",
                                                                  server={"limits": limits})))
                    for i in range(3)]
        clients = [stack.enter_context(httpx.Client(base_url=replica.url, timeout=120)) for replica in replicas]
        statuses = [chat(clients[i % 3]) for i in range(3 * per_minute)]
        refused = clients[0].post("/v1/chat/completions", headers={"authorization": f"Bearer {USER_KEY}"},
                                  json={"model": "echo-base", "messages": [{"role": "user", "content": "hi"}]})
    assert statuses.count(200) == per_minute and statuses.count(429) == 2 * per_minute  # R, not 3R
    assert statuses[:per_minute] == [200] * per_minute
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert "requests_per_min_per_key" in refused.json()["error"]["message"]


def test_slots_and_tokens_are_counted_once_across_replicas(redis_server: RedisServer) -> None:
    async def run() -> None:
        a = limiter(redis_server, max_concurrent_per_key=2, tokens_per_s_per_key=1, token_burst_per_key=100)
        b = limiter(redis_server, max_concurrent_per_key=2, tokens_per_s_per_key=1, token_burst_per_key=100)
        first, second = await a.enter("key"), await b.enter("key")
        with pytest.raises(RateLimited, match="concurrent"):
            await a.enter("key")
        assert await b.enter("other-key")  # another key's slots
        b.leave(second)
        await asyncio.wait(list(b._tasks))  # the release runs in the background
        a.leave(await a.enter("key"))
        a.leave(first)
        await a.spend("key", 60)
        with pytest.raises(RateLimited, match="tokens_per_s_per_key") as refused:
            await b.spend("key", 60)  # 40 left in the one bucket
        assert refused.value.retry_after_s >= 20
        await a.close()
        await b.close()

    asyncio.run(run())


def test_with_redis_down_each_replica_enforces_its_share_then_goes_back_to_redis(redis_server: RedisServer) -> None:
    async def run() -> None:
        replica = limiter(redis_server, requests_per_min_per_key=6, redis_timeout_s=2)
        await replica.enter("key")  # counted in Redis
        redis_server.stop()
        for _ in range(2):  # 6 per minute over 3 replicas: 2 here, never unlimited
            await replica.enter("key")
        with pytest.raises(RateLimited, match="requests_per_min_per_key"):
            await replica.enter("key")
        redis_server.start()  # an empty Redis: nothing counted there yet
        time.sleep(RETRY_S)  # past the pause before Redis is asked again (not an assertion on time)
        for _ in range(6):  # the shared window again: the local one is full
            await replica.enter("key")
        with pytest.raises(RateLimited):
            await replica.enter("key")
        await replica.close()

    with capture_logs() as logs:
        asyncio.run(run())
    events = [entry["event"] for entry in logs]
    assert events.count("limits_backend_down") == 1 and events.count("limits_backend_back") == 1
    down = next(entry for entry in logs if entry["event"] == "limits_backend_down")
    assert down["policy"] == "each replica enforces 1/3 of every limit"
