"""Per-key limits (messages, concurrency, token rate, generation deadline) and /metrics.

One server with tight limits serves every end-to-end test here; the token bucket
and the deadline also get pure-logic tests (no engine, no clock games on a server).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from lorag.config import LimitsSettings
from lorag.errors import LoragError
from lorag.server.deadline import GenerationTimeout, Guard
from lorag.server.limits import Limiter, RateLimited, TokenBucket
from tests.conftest import ADMIN_KEY, USER_KEY, Models, Server, start_server

OTHER_KEY = "sk-other-test-key"
TOKENS_KEY = "sk-tokens-test-key"
SLOW_KEYS = ("sk-slow-test-key-0", "sk-slow-test-key-1")  # huge requests leave their buckets deep in debt
TIMEOUT_S = 8
RATE = 10  # tokens/s for every key: slow, so the refill during a test is small
BURST = 1000
LIMITS = f"""
[server.limits]
max_messages = 4
max_concurrent_per_key = 2
tokens_per_s_per_key = {RATE}
token_burst_per_key = {BURST}
generation_timeout_s = {TIMEOUT_S}
"""
EXTRA_KEYS = f"""  {{ key = "{OTHER_KEY}", name = "other" }},
  {{ key = "{TOKENS_KEY}", name = "tokens" }},
  {{ key = "{SLOW_KEYS[0]}", name = "slow0" }},
  {{ key = "{SLOW_KEYS[1]}", name = "slow1" }},
"""


def auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def chat(model: str = "tiny-base", max_tokens: int = 8, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hello there"}],
            "max_tokens": max_tokens, "temperature": 0, **extra}


def assert_openai_error(response: httpx.Response, status: int, code: str | None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["code"] == code, error
    return dict(error)


@pytest.fixture(scope="module")
def limited(models: Models, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_server(models, tmp_path_factory.mktemp("limits"), extra_config=LIMITS, extra_keys=EXTRA_KEYS)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def http(limited: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=limited.url, timeout=120) as client:
        yield client


# -- end to end -----------------------------------------------------------------------


def test_too_many_messages_is_a_400_before_any_work(http: httpx.Client) -> None:
    body = chat()
    body["messages"] = [{"role": "user", "content": f"m{i}"} for i in range(5)]
    error = assert_openai_error(http.post("/v1/chat/completions", json=body, headers=auth(USER_KEY)),
                                400, "too_many_messages")
    assert error["param"] == "messages" and "max_messages" in error["message"]
    body["messages"] = body["messages"][:4]
    assert http.post("/v1/chat/completions", json=body, headers=auth(USER_KEY)).status_code == 200


def test_concurrency_is_limited_per_key_and_slots_come_back(http: httpx.Client, limited: Server) -> None:
    """Two streams in flight for one key: its third request is a 429; another key is still served."""
    long = chat(max_tokens=300, ignore_eos=True, stream=True)
    opened = threading.Barrier(3)
    finished: list[str] = []

    def stream() -> None:
        with httpx.stream("POST", f"{limited.api}/chat/completions", json=long, headers=auth(USER_KEY),
                          timeout=120) as response:
            lines = response.iter_lines()
            next(line for line in lines if line.startswith("data: "))  # in flight now
            opened.wait(timeout=60)
            finished.extend(line for line in lines if line.startswith("data: "))

    readers = [threading.Thread(target=stream) for _ in range(2)]
    for reader in readers:
        reader.start()
    opened.wait(timeout=60)
    try:
        refused = http.post("/v1/chat/completions", json=chat(), headers=auth(USER_KEY))
        error = assert_openai_error(refused, 429, "rate_limit_exceeded")
        assert error["type"] == "requests" and "max_concurrent_per_key" in error["message"]
        assert refused.headers["retry-after"] == "1"
        assert http.post("/v1/chat/completions", json=chat(), headers=auth(OTHER_KEY)).status_code == 200
    finally:
        for reader in readers:
            reader.join(timeout=120)
    assert finished.count("data: [DONE]") == 2
    assert http.post("/v1/chat/completions", json=chat(), headers=auth(USER_KEY)).status_code == 200


def test_token_rate_is_limited_per_key_with_retry_after(http: httpx.Client) -> None:
    """Each request costs prompt + max_tokens; the bucket holds BURST and refills RATE a second.

    The cost is in a long prompt, not in the answer: 400 generated tokens outran the module's
    TIMEOUT_S on a loaded machine (two 504s where two 200s were due), and a short answer keeps
    the refill during the first two requests well below what the third one lacks.
    """
    max_tokens = 8
    body = chat(max_tokens=max_tokens)
    body["messages"] = [{"role": "user", "content": " ".join(["notice"] * 210)}]
    answers = [http.post("/v1/chat/completions", json=body, headers=auth(TOKENS_KEY)) for _ in range(3)]
    assert [a.status_code for a in answers[:2]] == [200, 200], answers[1].text
    cost = answers[0].json()["usage"]["prompt_tokens"] + max_tokens
    assert 2 * cost <= BURST < 3 * cost - 20 * RATE  # two fit; the third lacks more than 20 s of refill
    error = assert_openai_error(answers[2], 429, "rate_limit_exceeded")
    assert error["type"] == "tokens" and "tokens_per_s_per_key" in error["message"]
    deficit = 3 * cost - BURST  # what the third one lacks, minus refill meanwhile
    assert 1 <= int(answers[2].headers["retry-after"]) <= deficit / RATE + 1
    # Another key has its own bucket.
    assert http.post("/v1/chat/completions", json=body, headers=auth(OTHER_KEY)).status_code == 200


@pytest.mark.parametrize("stream", [False, True])
def test_generation_timeout_stops_the_engine_request(http: httpx.Client, limited: Server, stream: bool) -> None:
    """Far more work than the deadline allows: a 504 (or an error event), and the engine stops early.

    16 prompts: they run at once, as in vLLM's own server (4 used to run one after another, which
    took past the deadline; at once they fit in it on a quiet machine)."""
    request_id = f"slow-{int(stream)}-{time.monotonic_ns()}"
    prompts = ["one", "two", "three", "four"] * 4
    body = {"model": "tiny-base", "prompt": prompts, "n": 16, "max_tokens": 480,
            "ignore_eos": True, "temperature": 1, "stream": stream}
    started = time.monotonic()
    response = http.post("/v1/completions", json=body, headers={**auth(SLOW_KEYS[stream]), "x-request-id": request_id})
    elapsed = time.monotonic() - started
    if stream:
        assert response.status_code == 200
        events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and "generation_timeout" in events[-2], events[-2:]
    else:
        assert_openai_error(response, 504, "generation_timeout")
    # The engine stopping short (below) proves the abort; the bound only catches a deadline
    # that is far off, with room for a busy machine's late reply.
    assert TIMEOUT_S <= elapsed < TIMEOUT_S + 30, elapsed
    time.sleep(1)
    generated = [e for e in limited.log_events() if e.get("request_id") == request_id and e.get("event") == "generate"]
    assert generated and generated[0]["completion_tokens"] < len(prompts) * 16 * 480, generated


def scrape(http: httpx.Client) -> dict[str, list[tuple[dict[str, str], float]]]:
    response = http.get("/metrics", headers=auth(ADMIN_KEY))
    assert response.status_code == 200, response.text
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def value(samples: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str) -> float:
    return sum(v for got, v in samples.get(name, []) if all(got.get(k) == w for k, w in labels.items()))


def test_metrics_count_requests_stages_tokens_adapters_and_knowledge(http: httpx.Client) -> None:
    assert_openai_error(http.get("/metrics", headers=auth(USER_KEY)), 403, None)
    before = scrape(http)
    assert "lorag_knowledge_chunks" not in before, "a scrape must not open the knowledge store"
    answer = http.post("/v1/chat/completions", json=chat("alpha"), headers=auth(OTHER_KEY)).json()
    ref = answer["lorag"]["adapter"]
    streamed = http.post("/v1/chat/completions", json=chat("alpha", stream=True,
                         stream_options={"include_usage": True}), headers=auth(OTHER_KEY))
    assert streamed.status_code == 200 and streamed.text.rstrip().endswith("data: [DONE]")
    assert http.post("/v1/chat/completions", json=chat("no-such-model"), headers=auth(OTHER_KEY)).status_code == 404
    after = scrape(http)

    chat_alpha = {"endpoint": "/v1/chat/completions", "domain": "alpha", "adapter": ref}
    assert value(after, "lorag_requests_total", **chat_alpha, status="200") \
        - value(before, "lorag_requests_total", **chat_alpha, status="200") == 2
    for stage in ("prepare", "generate"):
        assert value(after, "lorag_stage_duration_seconds_count", **chat_alpha, stage=stage) >= 2, stage
    assert value(after, "lorag_request_duration_seconds_count", **chat_alpha) >= 2
    prompt = answer["usage"]["prompt_tokens"]
    assert value(after, "lorag_tokens_total", **chat_alpha, kind="prompt") \
        - value(before, "lorag_tokens_total", **chat_alpha, kind="prompt") == 2 * prompt
    completion = value(after, "lorag_tokens_total", **chat_alpha, kind="completion") \
        - value(before, "lorag_tokens_total", **chat_alpha, kind="completion")
    assert completion == answer["usage"]["completion_tokens"] * 2
    # Failures: an unknown model is one fixed label, never the name the client sent.
    assert value(after, "lorag_requests_total", endpoint="/v1/chat/completions", domain="none", status="404") >= 1
    assert not any("no-such-model" in str(labels) for series in after.values() for labels, _ in series)
    assert value(after, "lorag_requests_total", status="429") >= 2  # the tests above
    assert value(after, "lorag_adapters_loaded") >= 4
    assert value(after, "lorag_adapters_registered") == 4
    assert value(after, "lorag_ready") == 1

    # Knowledge base sizes appear once the knowledge service is open.
    assert http.post("/v1/knowledge", json={"name": "notes"}, headers=auth(ADMIN_KEY)).status_code == 201
    files = [("files", ("a.md", b"# Notes\n\nRye flour needs more water than wheat flour.\n", "text/markdown"))]
    assert http.post("/v1/knowledge/notes/documents", files=files, headers=auth(ADMIN_KEY)).status_code == 200
    final = scrape(http)
    assert value(final, "lorag_knowledge_documents", kb="notes") == 1
    assert value(final, "lorag_knowledge_chunks", kb="notes") >= 1
    assert value(final, "lorag_requests_in_flight") == 0


def test_scanned_paths_share_one_endpoint_label(http: httpx.Client) -> None:
    for path in ("/nope", "/v2/chat", "/admin/../x"):
        http.get(path)
    samples = scrape(http)
    assert value(samples, "lorag_requests_total", endpoint="unmatched", status="404") >= 2
    assert not any("/nope" in str(labels) for series in samples.values() for labels, _ in series)


# -- pure logic ---------------------------------------------------------------------


def test_token_bucket_refills_and_lets_a_big_request_through_into_debt() -> None:
    bucket = TokenBucket(rate=10, capacity=100, level=100, updated=0)
    assert bucket.take(60, now=0) == 0
    assert bucket.take(60, now=0) == pytest.approx(2.0)  # 40 left, 60 needed: 2 s of refill
    assert bucket.take(60, now=2) == 0
    assert bucket.take(500, now=12) == 0  # larger than the bucket: passes when full ...
    assert bucket.take(10, now=12) == pytest.approx(41.0)  # ... and leaves it 400 in debt


def test_limiter_counts_slots_per_key() -> None:
    limiter = Limiter(LimitsSettings(max_concurrent_per_key=1, max_messages=2))
    limiter.acquire("a")
    limiter.acquire("b")
    with pytest.raises(RateLimited) as refused:
        limiter.acquire("a")
    assert refused.value.status_code == 429 and refused.value.headers == {"retry-after": "1"}
    limiter.release("a")
    limiter.acquire("a")
    limiter.check_messages({"messages": [{}, {}]})
    limiter.check_messages("not a dict")  # the body's own validation answers that
    with pytest.raises(LoragError, match="Too many messages"):
        limiter.check_messages({"messages": [{}, {}, {}]})
    asyncio.run(Limiter(LimitsSettings(max_concurrent_per_key=0, tokens_per_s_per_key=0)).spend("a", 10**9))  # 0 = off


def test_the_request_window_admits_per_minute_per_key_and_says_when_to_retry() -> None:
    limiter = Limiter(LimitsSettings(requests_per_min_per_key=2))
    assert limiter.count_request("a", 2, now=0) == 0 and limiter.count_request("a", 2, now=10) == 0
    assert limiter.count_request("a", 2, now=30) == pytest.approx(30)  # the first leaves the window at 60
    assert limiter.count_request("b", 2, now=30) == 0  # another key's minute
    assert limiter.count_request("a", 2, now=60) == 0


def test_each_of_n_workers_counting_in_memory_enforces_a_nth_of_every_limit() -> None:
    """`lorag serve --workers 2` without Redis: two processes, each half of the limits, never more in all."""

    async def admitted(limiter: Limiter) -> int:
        count = 0
        for _ in range(10):
            try:
                await limiter.enter("a")
                count += 1
            except RateLimited:
                pass
        return count

    settings = LimitsSettings(requests_per_min_per_key=5, max_concurrent_per_key=0)
    assert asyncio.run(admitted(Limiter(settings))) == 5
    assert asyncio.run(admitted(Limiter(settings, processes=2))) == 2  # 5 // 2: at least 1, never over
    assert asyncio.run(admitted(Limiter(LimitsSettings(requests_per_min_per_key=1), processes=2))) == 1


def test_deadline_stops_a_stream_and_closes_it() -> None:
    closed: list[bool] = []

    async def slow() -> AsyncIterator[int]:
        try:
            for i in range(100):
                await asyncio.sleep(0.05)
                yield i
        finally:
            closed.append(True)  # where the engine request would be aborted

    async def run() -> list[int]:
        got: list[int] = []
        with pytest.raises(GenerationTimeout):
            async for item in Guard(time.monotonic() + 0.3, 0.3).stream(slow()):
                got.append(item)
        return got

    got = asyncio.run(run())
    assert 2 <= len(got) < 10 and closed == [True]


def test_stream_deadline_never_cancels_the_consumer_between_chunks() -> None:
    """The deadline passes while the consumer works on a chunk: the consumer's own awaits go on,
    and the next wait for a chunk ends the stream; a cancel of the consumer stays a cancel."""

    async def endless() -> AsyncIterator[int]:
        i = 0
        while True:
            await asyncio.sleep(0.01)
            yield i
            i += 1

    async def busy_consumer() -> list[int]:
        got: list[int] = []
        with pytest.raises(GenerationTimeout):
            async for item in Guard(time.monotonic() + 0.05, 0.05).stream(endless()):
                got.append(item)
                time.sleep(0.1)  # past the deadline, outside the wait for a chunk
                await asyncio.sleep(0.01)  # a suspension the timer fires in: not cancelled here
        return got

    async def cancelled_consumer() -> None:
        async def consume() -> None:
            async for _ in Guard(time.monotonic() + 60, 60).stream(endless()):
                pass

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    assert asyncio.run(busy_consumer()) == [0]
    asyncio.run(cancelled_consumer())


def test_deadline_cancels_a_non_streamed_generation() -> None:
    cancelled: list[bool] = []

    async def work() -> str:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise
        return "never"

    async def run() -> None:
        guard = Guard(time.monotonic() + 0.1, 0.1)
        with pytest.raises(GenerationTimeout) as timeout:
            await guard.run(work())
        assert timeout.value.status_code == 504 and timeout.value.code == "generation_timeout"
        assert await Guard(None, 0).run(asyncio.sleep(0, result="ok")) == "ok"

    asyncio.run(run())
    assert cancelled == [True]


def test_limits_settings_refuse_nonsense(tmp_path: Path) -> None:
    from lorag.config import ConfigError, load_settings

    config = tmp_path / "lorag.toml"
    config.write_text("[server.limits]\nmax_concurent_per_key = 3\n")
    with pytest.raises(ConfigError, match="server.limits.max_concurent_per_key: unknown key"):
        load_settings(config)
    config.write_text("[server.limits]\ntokens_per_s_per_key = -1\n")
    with pytest.raises(ConfigError, match="server.limits.tokens_per_s_per_key"):
        load_settings(config)
