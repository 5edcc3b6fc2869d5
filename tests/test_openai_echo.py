"""The OpenAI routes through real HTTP and the official `openai` client, on the echo engine.

Shapes, errors, SSE framing, hold-back filters, retries, usage and logprobs: everything the
HTTP layer and the request path decide, in seconds (tests/echo_server.py). What needs the
real engine (adapter isolation, parity with transformers) stays in test_serving.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.echo_engine import Aborted
from tests.echo_server import USER_KEY, EchoServer, echo_server, echo_settings

EMAIL = "jane.doe@example.com"


@pytest.fixture(scope="module")
def echo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EchoServer]:
    settings = echo_settings(
        tmp_path_factory.mktemp("echo"),
        domains={"legal": {"system_prompt": "Be brief."}, "retry": {}, "redacted": {}},
        plugins={"modules": {"retry_once": "tests.plugins.retry_once"},
                 "domains": {"retry": {"enabled": ["retry_once"]},
                             "redacted": {"enabled": ["pii"], "hold_back_chars": 32}}},
    )
    with echo_server(settings) as server:
        yield server


@pytest.fixture
def client(echo: EchoServer) -> openai.OpenAI:
    echo.engine.replies.clear()
    return echo.client()


def streamed(stream: Any) -> tuple[str, str | None, list[Any], Any]:
    """(text, finish_reason, logprob entries, the last chunk) of a streamed chat completion."""
    text, finish, logprobs, last = "", None, [], None
    for chunk in stream:
        last = chunk
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
            if choice.logprobs and choice.logprobs.content:
                logprobs += choice.logprobs.content
    return text, finish, logprobs, last


def test_models_lists_domains_auto_and_the_base_model(client: openai.OpenAI) -> None:
    models = {model.id: model for model in client.models.list()}
    assert {"legal", "retry", "redacted", "auto", "echo-base"} <= set(models)
    assert all(model.object == "model" and model.owned_by == "lorag" for model in models.values())


def test_chat_streamed_and_not_give_the_same_text_usage_and_extras(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "hello there"}]
    reply = client.chat.completions.create(model="legal", messages=messages)
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl")
    assert reply.choices[0].message.content == "echo: hello there" and reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens == len("echo: hello there")
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.model_extra["lorag"]["domain"] == "legal"
    stream = client.chat.completions.create(model="legal", messages=messages, stream=True,
                                            stream_options={"include_usage": True})
    text, finish, _, last = streamed(stream)
    assert (text, finish) == ("echo: hello there", "stop")
    assert last.usage.model_dump() == reply.usage.model_dump() and last.choices == []


def test_text_completions_streamed_and_not_with_echo_and_logprobs(client: openai.OpenAI) -> None:
    reply = client.completions.create(model="echo-base", prompt="abc", max_tokens=4, echo=True, logprobs=2)
    choice = reply.choices[0]
    assert choice.text == "abcecho" and choice.finish_reason == "length"  # "echo: abc", cut to 4 tokens
    assert choice.logprobs.tokens == list("echo") and choice.logprobs.text_offset == [3, 4, 5, 6]
    stream = client.completions.create(model="echo-base", prompt="abc", max_tokens=4, echo=True, stream=True)
    pieces = [chunk.choices[0].text for chunk in stream if chunk.choices]
    assert "".join(pieces) == "abcecho"


def test_a_completions_prompts_run_at_once_each_with_its_own_room(echo: EchoServer, client: openai.OpenAI) -> None:
    """vLLM runs a request's prompts concurrently, each with all the room its own length leaves."""
    limit = echo.engine.max_model_len
    short, long = "s" * 10, "l" * (limit - 100)
    echo.engine.most_running = 0
    reply = client.completions.create(model="echo-base", prompt=[short, long])
    assert sorted(c.index for c in reply.choices) == [0, 1]
    budgets = {call.prompt[:1]: call.params.max_tokens for call in echo.engine.calls[-2:]}
    assert budgets == {"s": limit - 10, "l": 100}  # not both held to the long prompt's 100
    assert echo.engine.most_running == 2  # both were generating at the same time
    assert reply.usage.prompt_tokens == len(short) + len(long)


def test_errors_come_in_openais_shape(echo: EchoServer, client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert "GET /v1/models" in missing.value.message and missing.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as too_long:
        client.chat.completions.create(model="legal", messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=echo.engine.max_model_len)
    assert too_long.value.code == "context_length_exceeded"
    with pytest.raises(openai.AuthenticationError):
        echo.client(key="sk-wrong").models.list()
    bad = httpx.post(f"{echo.api}/chat/completions", content=b"{not json",
                     headers={"authorization": f"Bearer {USER_KEY}", "content-type": "application/json"})
    assert bad.status_code == 400 and set(bad.json()["error"]) == {"message", "type", "param", "code"}


def test_sse_frames_end_with_done(echo: EchoServer) -> None:
    body = {"model": "legal", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    with httpx.stream("POST", f"{echo.api}/chat/completions", json=body,
                      headers={"authorization": f"Bearer {USER_KEY}"}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["choices"][0]["delta"]["role"] == "assistant"


def test_an_engine_abort_is_an_error_not_a_normal_stop(echo: EchoServer, client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "hi"}]
    echo.engine.reply(Aborted("half an ans"))
    with pytest.raises(openai.InternalServerError) as err:
        client.chat.completions.create(model="legal", messages=messages)
    assert err.value.status_code == 503 and err.value.code == "generation_aborted"
    echo.engine.reply(Aborted("half an ans"))
    with pytest.raises(openai.APIError, match="aborted"):
        streamed(client.chat.completions.create(model="legal", messages=messages, stream=True))


def test_pii_is_held_back_and_its_logprobs_with_it(echo: EchoServer, client: openai.OpenAI) -> None:
    answer = f"Write to {EMAIL} today, please."
    redacted = "Write to [EMAIL_1] today, please."
    messages = [{"role": "user", "content": "whom?"}]
    echo.engine.reply(answer)
    reply = client.chat.completions.create(model="redacted", messages=messages, logprobs=True, top_logprobs=1)
    tokens = [entry.token for entry in reply.choices[0].logprobs.content]
    assert reply.choices[0].message.content == redacted
    assert "".join(tokens) == redacted.replace("[EMAIL_1]", "")  # the address's tokens are left out
    echo.engine.reply(answer)
    text, _, logprobs, _ = streamed(client.chat.completions.create(model="redacted", messages=messages, stream=True,
                                                                   logprobs=True, top_logprobs=1))
    assert text == redacted and [entry.token for entry in logprobs] == tokens
    assert reply.usage.completion_tokens == len(answer)  # what the model generated, redacted or not


def test_usage_and_logprobs_after_a_retry(echo: EchoServer, client: openai.OpenAI) -> None:
    """Every attempt is paid for; the logprobs are those of the answer that was sent."""
    messages = [{"role": "user", "content": "go"}]
    for stream in (False, True):
        echo.engine.reply("first answer, rejected", "second answer")
        before = len(echo.engine.calls)
        options: dict[str, Any] = {"logprobs": True, "top_logprobs": 2, "stream": stream}
        if stream:
            options["stream_options"] = {"include_usage": True}
        reply = client.chat.completions.create(model="retry", messages=messages, **options)
        if stream:
            text, _, logprobs, last = streamed(reply)
            usage = last.usage
        else:
            text, logprobs, usage = (reply.choices[0].message.content, reply.choices[0].logprobs.content,
                                     reply.usage)
        calls = echo.engine.calls[before:]
        assert text == "second answer" and len(calls) == 2
        assert "".join(entry.token for entry in logprobs) == "second answer"
        assert all(len(entry.top_logprobs) == 2 for entry in logprobs)
        assert usage.completion_tokens == len("first answer, rejected") + len("second answer")
        assert usage.prompt_tokens == sum(len(call.prompt) for call in calls)


def test_cors_preflight_is_answered_for_configured_origins(tmp_path: Path) -> None:
    settings = echo_settings(tmp_path, server={"cors_origins": ["https://app.example"]})
    with echo_server(settings) as echo:
        allowed = httpx.options(f"{echo.api}/chat/completions", headers={
            "origin": "https://app.example", "access-control-request-method": "POST",
            "access-control-request-headers": "authorization, content-type"})
        other = httpx.options(f"{echo.api}/chat/completions", headers={
            "origin": "https://evil.example", "access-control-request-method": "POST"})
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == "https://app.example"
    assert "access-control-allow-origin" not in other.headers


def test_a_fine_tuned_model_is_deleted_by_its_owner_only_through_models_delete(tmp_path: Path) -> None:
    from lorag.adapters.validate import AdapterInfo
    from lorag.config import ApiKey
    from lorag.server.auth import key_id
    from tests.echo_server import OTHER_TRAINER, TRAINER, trainer_keys

    model = "ft:echo-base:lorag:birds:ftjob-abc"
    with echo_server(echo_settings(tmp_path, server={"api_keys": trainer_keys()})) as server:
        source = tmp_path / "adapter"
        source.mkdir()
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            (source / name).write_text("{}")
        info = AdapterInfo(8, 16, ("q_proj",), "echo-base")
        server.pipeline.registry.register(model, source, info, owner=key_id(ApiKey(key=TRAINER).sha256))
        server.pipeline.registry.register("plain", source, info)
        owner, other = server.client(TRAINER), server.client(OTHER_TRAINER)
        with pytest.raises(openai.NotFoundError) as hidden:
            other.models.delete(model)
        assert hidden.value.body["type"] == "not_found_error"  # type: ignore[index]
        with pytest.raises(openai.PermissionDeniedError):
            owner.models.delete("plain")  # an operator's adapter: `lorag adapters remove`
        assert owner.models.delete(model).deleted
        assert model not in {m.id for m in owner.models.list()}
        with pytest.raises(openai.NotFoundError):
            owner.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
