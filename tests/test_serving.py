"""The serving core through real HTTP, the real engine and the official openai client."""

from __future__ import annotations

import asyncio
import itertools
import time

import httpx
import openai
import pytest

from tests.conftest import ANSWER_TIMEOUT_S, MAX_LORAS, SERVED_ADAPTERS, USER_KEY, Server

BASE = "tiny-base"
MODELS_UNDER_TEST = (BASE, *SERVED_ADAPTERS)
MESSAGES = [{"role": "user", "content": "What does the contract say about notice?"}]
PROMPT = "The tenant may terminate the lease"
TOKENS = 16


def greedy_chat(client: openai.OpenAI, model: str, **extra) -> str:
    reply = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=TOKENS, temperature=0, **extra)
    return reply.choices[0].message.content or ""


async def agreedy_chat(client: openai.AsyncOpenAI, model: str) -> tuple[str, str | None]:
    reply = await client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=TOKENS, temperature=0)
    extras = (reply.model_extra or {}).get("lorag") or {}
    return reply.choices[0].message.content or "", extras.get("adapter")


@pytest.fixture(scope="module")
def solo(client: openai.OpenAI) -> dict[str, str]:
    """Each model's greedy answer with nothing else running: the reference for every other test."""
    return {model: greedy_chat(client, model) for model in MODELS_UNDER_TEST}


def test_models_lists_base_and_adapters_with_parent(client: openai.OpenAI) -> None:
    models = {m.id: m for m in client.models.list().data}
    assert BASE in models
    for name in SERVED_ADAPTERS:
        assert name in models and f"{name}@v1" in models
        assert (models[name].model_extra or {})["parent"] == BASE


def test_each_adapter_answers_with_its_own_output(solo: dict[str, str]) -> None:
    assert len(set(solo.values())) == len(solo), solo


def test_streamed_chat_equals_non_streamed(client: openai.OpenAI, solo: dict[str, str]) -> None:
    for model in MODELS_UNDER_TEST:
        stream = client.chat.completions.create(
            model=model, messages=MESSAGES, max_tokens=TOKENS, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
        text, usage, finish = "", None, None
        for chunk in stream:
            for choice in chunk.choices:
                text += choice.delta.content or ""
                finish = choice.finish_reason or finish
            usage = chunk.usage or usage
        assert text == solo[model]
        assert finish == "length"
        assert usage is not None and usage.completion_tokens == TOKENS


def test_text_completions_streamed_and_not(client: openai.OpenAI) -> None:
    outputs = {}
    for model in MODELS_UNDER_TEST:
        reply = client.completions.create(model=model, prompt=PROMPT, max_tokens=TOKENS, temperature=0)
        assert reply.usage.completion_tokens == TOKENS
        assert reply.usage.prompt_tokens > 0
        streamed = "".join(
            c.choices[0].text for c in client.completions.create(
                model=model, prompt=PROMPT, max_tokens=TOKENS, temperature=0, stream=True) if c.choices
        )
        assert streamed == reply.choices[0].text
        outputs[model] = reply.choices[0].text
    assert len(set(outputs.values())) == len(outputs)


def test_usual_parameters(client: openai.OpenAI) -> None:
    reply = client.completions.create(model="alpha", prompt=PROMPT, max_tokens=8, n=3, temperature=0.9,
                                      top_p=0.9, seed=7, presence_penalty=0.5, frequency_penalty=0.5, logprobs=2)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert len(reply.choices[0].logprobs.tokens) == 8
    assert reply.usage.completion_tokens == 24
    again = client.completions.create(model="alpha", prompt=PROMPT, max_tokens=8, n=3, temperature=0.9,
                                      top_p=0.9, seed=7, presence_penalty=0.5, frequency_penalty=0.5)
    assert [c.text for c in again.choices] == [c.text for c in reply.choices]  # seeded
    chat = client.chat.completions.create(model="beta", messages=MESSAGES, max_tokens=4, logprobs=True, top_logprobs=2)
    first = chat.choices[0].logprobs.content[0]
    assert len(first.top_logprobs) == 2 and first.logprob <= 0
    full = greedy_chat(client, "beta")
    stop = full[3:6]
    cut = client.chat.completions.create(model="beta", messages=MESSAGES, max_tokens=TOKENS, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == full[: full.index(stop)]


def test_batched_requests_get_exactly_their_adapter(async_client: openai.AsyncOpenAI, solo: dict[str, str]) -> None:
    """More distinct adapters than max_loras in flight at once, in every combination, three rounds each."""

    async def run() -> list[tuple[tuple[str, ...], str, str]]:
        wrong = []
        for size in range(2, MAX_LORAS + 2):
            for combo in itertools.combinations(MODELS_UNDER_TEST, size):
                batch = [m for m in combo for _ in range(2)]
                answers = await asyncio.gather(*(agreedy_chat(async_client, m) for m in batch))
                wrong += [(combo, m, a) for m, (a, _) in zip(batch, answers, strict=True) if a != solo[m]]
        return wrong

    assert asyncio.run(run()) == []


def test_unknown_model_and_bad_requests_get_openai_errors(server: Server, client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        greedy_chat(client, "no-such-adapter")
    assert err.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=BASE, messages=MESSAGES, max_tokens=-5)
    assert err.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "word " * 600}], max_tokens=4)
    assert err.value.body["code"] == "context_length_exceeded" and "512" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=BASE, prompt=PROMPT, n=2, temperature=0)  # vLLM refuses greedy n>1
    headers = {"authorization": f"Bearer {USER_KEY}", "content-type": "application/json"}
    raw = [
        b'{"model": "tiny-base", "messages": [',  # malformed JSON
        b'{"model": "tiny-base", "messages": "hello"}',  # wrong type
        b'{"model": 7, "messages": [{"role": "user", "content": "hi"}]}',
        b'{"model": "tiny-base", "messages": [{"role": "wizard", "content": "hi"}]}',
        b'{"model": "tiny-base", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}',
        b'[]',
    ]
    for body in raw:
        response = httpx.post(f"{server.api}/chat/completions", content=body, headers=headers)
        assert response.status_code == 400, body
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
        assert "Traceback" not in response.text
    assert httpx.post(f"{server.api}/chat/completions", json={"model": BASE, "messages": MESSAGES}).status_code == 401
    assert httpx.get(f"{server.url}/admin/adapters", headers={"authorization": f"Bearer {USER_KEY}"}).status_code == 403
    assert httpx.get(f"{server.url}/nope").json()["error"]["type"] == "not_found_error"
    too_big = httpx.post(f"{server.api}/completions", headers=headers, content=b"x" * (5 << 20))
    assert too_big.status_code == 413
    upload = httpx.post(f"{server.api}/knowledge/no-such-kb/documents", headers={"authorization": headers["authorization"]},
                        files={"files": ("big.txt", b"word " * (1 << 20))})  # 5 MiB: above the JSON limit, within uploads'
    assert upload.status_code != 413, upload.text
    assert greedy_chat(client, "alpha")  # still serving


def test_health_and_ready(server: Server) -> None:
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
    assert httpx.get(f"{server.url}/ready").json()["status"] == "ready"


def hang_up_after_first_chunk(server: Server, request_id: str, max_tokens: int) -> int:
    """Stream a long answer, leave after its first chunk; the tokens the server then says it generated."""
    headers = {"authorization": f"Bearer {USER_KEY}", "x-request-id": request_id}
    body = {"model": "gamma", "messages": MESSAGES, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", f"{server.api}/chat/completions", json=body, headers=headers,
                      timeout=ANSWER_TIMEOUT_S) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                break  # one chunk, then hang up
    deadline = time.monotonic() + 120  # the request's `generate` event is logged once it ends
    while (generated := server.completion_tokens(request_id)) is None:
        assert time.monotonic() < deadline, f"{request_id}: no generate event"
        time.sleep(0.2)
    return generated


def test_client_disconnect_aborts_the_engine_request(server: Server) -> None:
    """Hanging up stops the engine before the answer's end.

    A starved machine can generate all 400 tokens before the first reaches the client (seen behind
    the fleet at load ~20: lorag got every token in one 26 ms burst, 2 s after asking), leaving
    nothing to abort. Such a try proves nothing either way, so the probe runs up to three times and
    one must stop short; code that never aborts reads 400 on every try.
    """
    max_tokens = 400
    tries = []
    for attempt in range(3):
        tries.append(hang_up_after_first_chunk(server, f"disconnect-probe-{attempt}", max_tokens))
        if tries[-1] < max_tokens:
            break
    assert tries[-1] < max_tokens, f"every try generated the whole answer: {tries}"
