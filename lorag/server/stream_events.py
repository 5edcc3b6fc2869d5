"""The server-sent events of a chat or text stream, written without model objects per token.

Every event of a stream but the last carries one choice's delta, and its head (id, object,
created, model) is the same throughout: it is rendered once, and each event is that head, the
choice's JSON (orjson) and a tail. The bytes are those pydantic writes for the same
`StreamChunk` with `exclude_unset` (tests/test_stream_events.py checks them), so clients see the
same stream. A choice with logprobs (floats, which the two libraries may write differently) and
the last chunk (usage, lorag's extras) go through pydantic, once per event that has them.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

from lorag.serving.protocol import StreamChunk

JSON_EVENT = b"data: %b\n\n"


def event(chunk: StreamChunk) -> bytes:
    """One event, written by pydantic: the general path."""
    return JSON_EVENT % chunk.model_dump_json(exclude_unset=True).encode()


def json_event(body: Any) -> bytes:
    """One event holding any JSON value (an error body: rare, written as it always was)."""
    return JSON_EVENT % json.dumps(body).encode()


class ChoiceEvents:
    """The events of one stream that carry a single choice and no logprobs: head and tail rendered once."""

    def __init__(self, request_id: str, kind: str, created: int, model: str, include_usage: bool) -> None:
        head = orjson.dumps({"id": request_id, "object": kind, "created": created, "model": model})
        self._head = b"data: " + head[:-1] + b',"choices":['
        # `usage: null` in every chunk but the last when the client asked for usage (OpenAI's shape).
        self._tail = b'],"usage":null}\n\n' if include_usage else b"]}\n\n"

    def event(self, choice: dict[str, Any]) -> bytes:
        """`choice` (plain JSON values, keys in the protocol's field order) as one event."""
        return self._head + orjson.dumps(choice) + self._tail


def chat_choice(index: int, text: str, finish_reason: str | None,
                tool_calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A chat stream's choice (ChatChunkChoice with its ChatDelta, unset fields left out): the text,
    or nothing in a last delta without text; the client's tool calls when the model made some."""
    delta: dict[str, Any] = {"content": text} if text or not finish_reason else {}
    if tool_calls:
        delta["tool_calls"] = tool_calls
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}


def opening_choice(index: int) -> dict[str, Any]:
    """A chat choice's first chunk: the assistant's role, with empty content (as OpenAI sends it)."""
    return {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}


def text_choice(index: int, text: str, finish_reason: str | None) -> dict[str, Any]:
    """A text completion stream's choice (TextChoice) without logprobs."""
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}
