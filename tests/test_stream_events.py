"""The per-token SSE writer (lorag.server.stream_events) writes exactly the bytes pydantic wrote for
the same StreamChunk: clients of a stream cannot tell the two paths apart."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lorag.server.stream_events import (
    ChoiceEvents,
    chat_choice,
    event,
    json_event,
    opening_choice,
    text_choice,
)
from lorag.serving.protocol import ChatChunkChoice, ChatDelta, StreamChunk, TextChoice

# Characters JSON writers disagree on most: quotes, backslashes, controls, DEL, separators, non-BMP.
TRICKY = ['"', "\\", "\n", "\r", "\t", "\x00", "\x1f", "\x7f", "/", "\u2028", "\u2029", "é", "中", "😀", "\ufffd", "</"]


def old_event(request_id: str, kind: Any, model: str, include_usage: bool, choice: Any) -> bytes:
    """What lorag wrote before: a StreamChunk per event, dumped by pydantic."""
    extra = {"usage": None} if include_usage else {}
    return event(StreamChunk(id=request_id, object=kind, created=1_700_000_000, model=model, choices=[choice],
                             **extra))


def new_events(request_id: str, kind: str, model: str, include_usage: bool) -> ChoiceEvents:
    return ChoiceEvents(request_id, kind, 1_700_000_000, model, include_usage)


@pytest.mark.parametrize("include_usage", [False, True])
@pytest.mark.parametrize("text", ["", "hello", " world", *TRICKY, "".join(TRICKY)])
@pytest.mark.parametrize("finish", [None, "stop", "length", "content_filter"])
def test_chat_events_equal_pydantic(include_usage: bool, text: str, finish: str | None) -> None:
    content = ChatDelta(content=text) if text or not finish else ChatDelta()
    old = old_event("chatcmpl-1", "chat.completion.chunk", "legal", include_usage,
                    ChatChunkChoice(index=2, delta=content, logprobs=None, finish_reason=finish))
    new = new_events("chatcmpl-1", "chat.completion.chunk", "legal", include_usage).event(
        chat_choice(2, text, finish))
    assert new == old


def test_opening_and_tool_call_events_equal_pydantic() -> None:
    events = new_events("chatcmpl-2", "chat.completion.chunk", "m\u00e9\"x", True)
    opening = ChatChunkChoice(index=0, delta=ChatDelta(role="assistant", content=""), logprobs=None,
                              finish_reason=None)
    assert events.event(opening_choice(0)) == old_event("chatcmpl-2", "chat.completion.chunk", "m\u00e9\"x", True,
                                                        opening)
    calls = [{"index": 0, "id": "call_1", "type": "function",
              "function": {"name": "lookup", "arguments": '{"q": "caf\u00e9 \\"x\\""}'}}]
    for text in ("", "I will look it up."):
        content = ChatDelta(content=text) if text else ChatDelta()
        content.tool_calls = calls
        old = old_event("chatcmpl-2", "chat.completion.chunk", "m\u00e9\"x", True,
                        ChatChunkChoice(index=0, delta=content, logprobs=None, finish_reason="tool_calls"))
        assert events.event(chat_choice(0, text, "tool_calls", calls)) == old


@pytest.mark.parametrize("include_usage", [False, True])
@pytest.mark.parametrize("finish", [None, "stop"])
def test_text_events_equal_pydantic(include_usage: bool, finish: str | None) -> None:
    for text in ["", "plain", *TRICKY]:
        old = old_event("cmpl-3", "text_completion", "base", include_usage,
                        TextChoice(index=1, text=text, logprobs=None, finish_reason=finish))
        assert new_events("cmpl-3", "text_completion", "base", include_usage).event(
            text_choice(1, text, finish)) == old


@given(st.text(), st.text(min_size=1))
def test_any_text_and_model_equal_pydantic(text: str, model: str) -> None:
    old = old_event("chatcmpl-4", "chat.completion.chunk", model, True,
                    ChatChunkChoice(index=0, delta=ChatDelta(content=text), logprobs=None, finish_reason=None))
    assert new_events("chatcmpl-4", "chat.completion.chunk", model, True).event(chat_choice(0, text, None)) == old


def test_json_event() -> None:
    body = {"error": {"message": "caf\u00e9 \"stopped\"", "type": "server_error", "param": None, "code": None}}
    assert json_event(body) == f"data: {json.dumps(body)}\n\n".encode()  # as before: byte for byte
