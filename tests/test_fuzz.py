"""Fuzzing: hostile input never gets a 5xx, and every error is OpenAI-shaped.

- schemathesis reads the running server's own /openapi.json and sends valid and
  invalid requests to every operation, with the admin key (reaches everything) and a
  user key; a bounded, derandomized run (the same few hundred cases every time).
- hypothesis throws arbitrary JSON at the request models of lorag.serving.protocol:
  they accept it or raise a ValidationError (a 400), never anything else (a 500).
The server has its own state directory, so what the fuzz deletes or creates
(adapters, knowledge bases) touches no other test.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from pydantic import ValidationError

from lorag.serving.protocol import ChatCompletionRequest, CompletionRequest
from tests.conftest import (
    ADMIN_KEY,
    BASE_NAME,
    SERVED_ADAPTERS,
    USER_KEY,
    Models,
    Server,
    start_server,
)

EXAMPLES = {ADMIN_KEY: 20, USER_KEY: 5}  # per operation and generation mode
KB = "fuzzed"
ERROR_KEYS = {"message", "type", "param", "code"}


@dataclass
class Target:
    server: Server
    known: dict[str, list[Any]]  # body fields / path parameters -> values that exist on the server


@pytest.fixture(scope="module")
def fuzz_target(models: Models, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    workdir = tmp_path_factory.mktemp("fuzz")
    docs = workdir / "docs"
    docs.mkdir()
    (docs / "notes.md").write_text("# Notes\n\nRye flour needs more water than wheat flour.\n")
    config = f"""
[server.limits]
generation_timeout_s = 60

[knowledge.ingest]
allowed_roots = ["{docs}"]
"""
    server = start_server(models, workdir, extra_config=config)
    try:
        created = httpx.post(f"{server.url}/v1/knowledge/{KB}/ingest", json={"paths": [str(docs)], "create": True},
                             headers={"authorization": f"Bearer {ADMIN_KEY}"}, timeout=120)
        assert created.status_code == 200, created.text
        # Half the cases name things that exist, to get past "not found" into the deeper code.
        known: dict[str, list[Any]] = {
            "model": [BASE_NAME, *SERVED_ADAPTERS],
            "name": list(SERVED_ADAPTERS),
            "kb": [KB],
            "path": [str(models.adapters["swap1"]), str(models.adapters["swap2"]), str(docs)],
            "paths": [[str(docs)], [str(docs / "notes.md")], [f"{docs}/../lorag.toml"], [f"{docs}/*.md"]],
        }
        yield Target(server, known)
    finally:
        server.stop()


def problems_with(response: Any) -> str | None:
    """Why this response is wrong, or None: no 5xx, OpenAI-shaped 4xx and in-stream errors."""
    status = response.status_code
    if status >= 500:
        return f"{status}: {response.text[:300]}"
    if status >= 400:
        try:
            error = response.json()["error"]
        except (ValueError, KeyError, TypeError):
            return f"{status} not OpenAI-shaped: {response.text[:300]}"
        if not isinstance(error, dict) or set(error) != ERROR_KEYS or not isinstance(error["message"], str):
            return f"{status} not OpenAI-shaped: {response.text[:300]}"
        return None
    content_type = response.headers.get("content-type") or [""]  # schemathesis: name -> list of values
    if content_type[0].startswith("text/event-stream"):
        events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
        if not events or events[-1] != "[DONE]":
            return f"stream did not end with [DONE]: {events[-2:]}"
        for event in events[:-1]:
            data = json.loads(event)
            if "error" in data and (set(data["error"]) != ERROR_KEYS or data["error"]["type"] == "server_error"):
                return f"stream error event: {event[:300]}"
    return None


def fuzz(operation: Any, mode: Any, target: Target, key: str, examples: int, record: Path) -> tuple[int, list[str]]:
    """Run `examples` generated cases of one operation; return (cases sent, failures).

    Each failure is also appended to `record` in full (JSON lines), to replay it by hand."""
    headers = {"authorization": f"Bearer {key}"}
    failures: list[str] = []
    calls = 0

    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode), known=st.booleans(), data=st.data())
    def probe(case: Any, known: bool, data: st.DataObject) -> None:
        nonlocal calls
        calls += 1
        if known:
            for field, values in target.known.items():
                if isinstance(case.path_parameters, dict) and field in case.path_parameters:
                    case.path_parameters[field] = data.draw(st.sampled_from(values))
                if isinstance(case.body, dict) and field in case.body:
                    case.body[field] = data.draw(st.sampled_from(values))
        response = case.call(base_url=target.server.url, headers=headers, timeout=120)
        problem = problems_with(response)
        if problem is not None:
            failures.append(f"{case.method} {case.formatted_path} ({mode.value}, key {key[:7]}) "
                            f"query={case.query} body={str(case.body)[:200]}: {problem}")
            with record.open("a") as out:
                out.write(json.dumps({"method": case.method, "path": case.formatted_path, "query": case.query,
                                      "body": case.body, "key": key[:7], "problem": problem,
                                      "response": response.text[-2000:]}, default=repr) + "\n")

    with contextlib.suppress(Unsatisfiable):  # negative mode: an operation without parameters has no invalid input
        probe()
    return calls, failures


def test_openapi_fuzz_finds_no_server_errors(fuzz_target: Target) -> None:
    import schemathesis
    from schemathesis.config import SchemathesisConfig

    # Read streams to their end (schemathesis stops after 20 events): errors may come last.
    config = SchemathesisConfig.from_dict({"max-stream-events": 100_000})
    schema = schemathesis.openapi.from_url(f"{fuzz_target.server.url}/openapi.json", config=config)
    # Deletions last, so the adapters and the knowledge base they may remove serve the other operations first.
    operations = sorted((result.ok() for result in schema.get_all_operations()), key=lambda op: op.method == "delete")
    assert len(operations) >= 15, [op.label for op in operations]
    failures: list[str] = []
    calls = 0
    record = fuzz_target.server.log_path.parent / "fuzz_failures.jsonl"
    started = time.monotonic()
    for key, examples in EXAMPLES.items():
        for operation in operations:
            for mode in schemathesis.GenerationMode:
                sent, failed = fuzz(operation, mode, fuzz_target, key, examples, record)
                calls += sent
                failures += failed
    elapsed = time.monotonic() - started
    assert not failures, f"{len(failures)} of {calls} cases failed (all in {record}):\n" + "\n".join(failures[:20])
    assert fuzz_target.server.process.poll() is None, "the server died under the fuzz"
    assert "unhandled_error" not in fuzz_target.server.log_path.read_text()
    print(f"fuzz: {calls} cases in {elapsed:.0f} s")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)


def near_valid(fields: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    """A valid body with some of its fields (and of the model's other fields) replaced by anything."""
    names = sorted({*fields, *ChatCompletionRequest.model_fields, *CompletionRequest.model_fields})
    return st.builds(lambda changes: {**fields, **changes},
                     st.dictionaries(st.sampled_from(names), json_values, max_size=5))


CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
COMPLETION = {"model": "m", "prompt": "hi"}


@settings(max_examples=300, deadline=None, database=None, derandomize=True)
@given(body=near_valid(CHAT) | json_values)
def test_chat_request_model_accepts_or_refuses_cleanly(body: Any) -> None:
    try:
        request = ChatCompletionRequest.model_validate(body)
    except ValidationError:
        return
    for message in request.messages:
        assert isinstance(message.text(), str)
    assert request.output_limit is None or request.output_limit >= 1


@settings(max_examples=300, deadline=None, database=None, derandomize=True)
@given(body=near_valid(COMPLETION) | json_values)
def test_completion_request_model_accepts_or_refuses_cleanly(body: Any) -> None:
    try:
        request = CompletionRequest.model_validate(body)
    except ValidationError:
        return
    prompts = request.prompts()
    assert prompts and all(isinstance(p, str | list) for p in prompts)
