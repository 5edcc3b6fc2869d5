"""The request path on a fake engine (tests/echo_engine.py): resolution, budgets, output hooks
with retries and hold-back, the tool loop, retrieval failures. Seconds, no vLLM engine; the
same paths run against the real engine in test_serving, test_domains and test_plugins_server.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from lorag.config import Settings
from lorag.errors import NotFoundError, PermissionDenied
from lorag.knowledge.retrieval import Hit
from lorag.plugins import PluginContext, Verdict, hookimpl
from lorag.plugins.host import PluginHost
from lorag.plugins.manager import add_plugin, load_plugins
from lorag.serving.build import build_pipeline
from lorag.serving.context import KnowledgeUnavailable
from lorag.serving.generation import ContextTooLong
from lorag.serving.jobs import new_request_id
from lorag.serving.pipeline import Pipeline
from lorag.serving.principal import Principal
from lorag.serving.protocol import ChatCompletionRequest, CompletionRequest
from tests.echo_engine import EchoEngine

BASE = "echo-base"


def settings_for(tmp_path: Path, **tables: Any) -> Settings:
    return Settings.model_validate({"state_dir": str(tmp_path / "state"), "model": {"path": BASE}, **tables})


def pipeline_for(settings: Settings, engine: EchoEngine, plugins: dict[str, Any] | None = None,
                 knowledge: Any = None) -> Pipeline:
    """The pipeline the server would build, on the echo engine, with test plugins added."""
    loaded = load_plugins(settings.plugins.modules, load="")  # entry points off: nothing installed leaks in
    for name, plugin in (plugins or {}).items():
        assert add_plugin(loaded, name, plugin).ok
    return build_pipeline(settings, engine, plugins=PluginHost(loaded, settings.plugins), knowledge=knowledge)


def chat(pipeline: Pipeline, question: str, principal: Principal | None = None, **body: Any) -> tuple[Any, str]:
    """One chat request through prepare_chat and generate: (the job, the text the client saw)."""
    request = ChatCompletionRequest.model_validate(
        {"model": body.pop("model", BASE), "messages": [{"role": "user", "content": question}], **body})

    async def run() -> tuple[Any, str]:
        job = await pipeline.prepare_chat(request, new_request_id("t"), principal)
        text = "".join([delta.text async for delta in pipeline.generate(job)])
        return job, text

    return asyncio.run(run())


def test_streamed_and_collected_answers_are_the_same_text(tmp_path: Path) -> None:
    engine = EchoEngine()
    pipeline = pipeline_for(settings_for(tmp_path), engine)
    _, streamed = chat(pipeline, "hello there", stream=True)
    job, collected = chat(pipeline, "hello there", stream=False)
    assert streamed == collected == "echo: hello there"
    assert job.completion_tokens == len(collected) and job.prompt_tokens == len(engine.calls[-1].prompt)
    assert {"resolve_ms", "prepare_ms", "generate_ms", "ttft_ms"} <= set(job.timings)
    assert engine.calls[-1].adapter is None and job.extras["attempts"] == 1


def test_resolution_refuses_unknown_models_and_keys_scoped_to_domains(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, domains={"legal": {"description": "contracts and leases"}})
    pipeline = pipeline_for(settings, EchoEngine())
    with pytest.raises(NotFoundError, match="GET /v1/models"):
        chat(pipeline, "hi", model="no-such-model")
    scoped = Principal(name="clerk", admin=False, domains=frozenset({"legal"}))
    with pytest.raises(PermissionDenied, match="only use its domains"):
        chat(pipeline, "hi", scoped)
    job, _ = chat(pipeline, "hi", scoped, model="legal")
    assert job.target.domain is not None and job.target.plugin_scope == "legal"
    with pytest.raises(NotFoundError, match="has no adapter"):
        chat(pipeline, "hi", model="legal@v2")


def test_output_budget_is_what_the_window_leaves_or_a_400_with_numbers(tmp_path: Path) -> None:
    engine = EchoEngine(max_model_len=64)
    pipeline = pipeline_for(settings_for(tmp_path), engine)
    job, _ = chat(pipeline, "hi")
    assert job.params.max_tokens == 64 - job.prompt_tokens
    with pytest.raises(ContextTooLong, match="maximum context length is 64 tokens") as refused:
        chat(pipeline, "hi", max_tokens=60)
    assert refused.value.param == "max_tokens"
    with pytest.raises(ContextTooLong) as too_long:
        chat(pipeline, "x" * 80)
    assert too_long.value.param == "messages" and not engine.calls[1:]


def test_domain_generation_limits_apply(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, domains={"legal": {"generation": {"max_tokens": 5, "max_tokens_limit": 8}}})
    pipeline = pipeline_for(settings, EchoEngine())
    job, text = chat(pipeline, "a long question", model="legal")
    assert job.params.max_tokens == 5 and text == "echo:"
    with pytest.raises(Exception, match="above the domain's limit of 8"):
        chat(pipeline, "hi", model="legal", max_tokens=9)


class RetryOnce:
    """Rejects the first answer with a message the model reads, accepts the next."""

    @hookimpl
    def request_received(self, ctx: PluginContext) -> None:
        ctx.hold_output()  # a validator that may retry holds the answer until it is judged

    @hookimpl
    def output_complete(self, text: str, ctx: PluginContext) -> Verdict | None:
        return Verdict.retry("Answer in French.") if ctx.attempt == 0 else None


def test_a_validator_retry_asks_again_with_its_message_and_only_the_last_answer_is_sent(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, plugins={"default": ["retry_once"]})
    engine = EchoEngine().reply("Hello", "Bonjour")
    job, text = chat(pipeline_for(settings, engine, {"retry_once": RetryOnce()}), "greet me", stream=True)
    assert text == "Bonjour" and job.extras["attempts"] == 2
    second = engine.calls[1].prompt
    assert "<|assistant|>Hello<|end|><|user|>Answer in French.<|end|>" in second
    # No max_tokens asked for: the retry gets what its longer prompt leaves, not the first room.
    assert engine.calls[1].params.max_tokens == engine.max_model_len - len(second)


def test_hold_back_keeps_a_blocked_word_from_ever_being_streamed(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, plugins={"default": ["blocklist"], "settings": {"blocklist": {"terms": ["password"]}}})
    engine = EchoEngine(chunk_chars=2).reply("Sure, the password is hunter2, keep it safe.")
    pipeline = pipeline_for(settings, engine)
    request = ChatCompletionRequest.model_validate(
        {"model": BASE, "messages": [{"role": "user", "content": "what is it?"}], "stream": True})

    async def run() -> list[Any]:
        job = await pipeline.prepare_chat(request, new_request_id("t"))
        return [delta async for delta in pipeline.generate(job)]

    deltas = asyncio.run(run())
    sent = "".join(delta.text for delta in deltas)
    assert "password" not in sent and "hunter2" not in sent
    assert deltas[-1].finish_reason == "content_filter" and "content filter" in sent


class Arithmetic:
    @hookimpl
    def register_tools(self, register: Any) -> None:
        def add(a: int, b: int) -> int:
            """Add two integers."""
            return a + b

        register(add)


def test_the_tool_loop_runs_server_side_calls_and_feeds_results_back(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, domains={"maths": {"tools": {"enabled": ["add"]}}},
                            plugins={"domains": {"maths": {"enabled": ["arithmetic"]}}})
    call = '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>'
    engine = EchoEngine().reply(call, "The sum is 5.")
    job, text = chat(pipeline_for(settings, engine, {"arithmetic": Arithmetic()}), "2 + 3?", model="maths")
    assert text == "The sum is 5."
    trace = job.extras["tools"]["calls"]
    assert [(c["name"], c["arguments"], c["result"]) for c in trace] == [("add", '{"a": 2, "b": 3}', "5")]
    assert "<|tool|>5<|end|>" in engine.calls[1].prompt  # the result went back to the model
    assert '"name": "add"' in engine.calls[0].prompt  # the tool was on offer in the first step
    # Usage counts both steps, the call the client never saw included.
    assert job.prompt_tokens == len(engine.calls[0].prompt) + len(engine.calls[1].prompt)
    assert job.completion_tokens == len(call) + len(text)


class RecordingLink:
    """A knowledge link whose store answers every search with one passage and records the call."""

    def __init__(self) -> None:
        self.searches: list[tuple[list[str], str, int | None]] = []

    def get(self) -> RecordingLink:
        return self

    def query(self, kbs: list[str], question: str, *, top_k: int | None, **_: Any) -> list[Hit]:
        self.searches.append((kbs, question, top_k))
        return [Hit(kb=kbs[0], source="lease.md", location="§ 4", text="The deposit is returned in 14 days.",
                    score=0.9)]


def test_search_knowledge_is_a_builtin_tool_that_searches_the_requests_domain(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, domains={"legal": {"knowledge": {"bases": ["leases"], "top_k": 2},
                                                         "tools": {"enabled": ["search_knowledge"]}}})
    link = RecordingLink()
    call = '<tool_call>{"name": "search_knowledge", "arguments": {"query": "deposit", "top_k": 99}}</tool_call>'
    engine = EchoEngine().reply(call, "Within 14 days [1].")
    job, text = chat(pipeline_for(settings, engine, knowledge=link), "deposit?", model="legal",
                     lorag={"no_retrieval": True})
    assert text == "Within 14 days [1]."
    # The domain's bases, the model's query, top_k held to the most one search may return.
    assert link.searches == [(["leases"], "deposit", 20)]
    (trace,) = job.extras["tools"]["calls"]
    assert trace["name"] == "search_knowledge" and "14 days" in trace["result"] and "lease.md" in trace["result"]


class BrokenLink:
    """A knowledge link whose store is down."""

    def get(self) -> Any:
        raise RuntimeError("store unreachable")


@pytest.mark.parametrize("on_error", ["continue", "fail"])
def test_a_failed_retrieval_follows_the_domains_on_error(tmp_path: Path, on_error: str) -> None:
    settings = settings_for(tmp_path, domains={"support": {"knowledge": {"bases": ["manuals"], "on_error": on_error}}})
    pipeline = pipeline_for(settings, EchoEngine(), knowledge=BrokenLink())
    if on_error == "fail":
        with pytest.raises(KnowledgeUnavailable, match="store unreachable"):
            chat(pipeline, "how do I reset it?", model="support")
        return
    job, text = chat(pipeline, "how do I reset it?", model="support")
    assert text == "echo: how do I reset it?" and job.citations == []
    assert job.extras["retrieval"] == {"skipped": True, "error": "store unreachable"}


def test_text_completions_take_several_prompts_and_n_choices(tmp_path: Path) -> None:
    engine = EchoEngine()
    pipeline = pipeline_for(settings_for(tmp_path), engine)
    request = CompletionRequest.model_validate({"model": BASE, "prompt": ["one", "two"], "n": 2, "max_tokens": 4})

    async def run() -> list[Any]:
        job = await pipeline.prepare_completion(request, new_request_id("t"))
        return await pipeline.complete(job)

    choices = asyncio.run(run())
    assert [c.index for c in choices] == [0, 1, 2, 3]
    assert all(c.text == "echo" and c.finish_reason == "length" for c in choices)
    assert [call.prompt for call in engine.calls] == ["one", "two"]


def test_a_fine_tuned_model_is_its_owners_and_admins_by_name_and_any_keys_through_a_domain(tmp_path: Path) -> None:
    from lorag.adapters.validate import AdapterInfo

    model = "ft:echo-base:lorag:birds:ftjob-abc"
    settings = settings_for(tmp_path, domains={"birds": {"description": "birds", "adapter": model}})
    pipeline = pipeline_for(settings, EchoEngine())
    source = tmp_path / "adapter"
    source.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (source / name).write_text("{}")
    pipeline.registry.register(model, source, AdapterInfo(8, 16, ("q_proj",), BASE), owner="key-owner")
    owner = Principal(name="owner", admin=False, key_id="key-owner")
    other = Principal(name="other", admin=False, key_id="key-other")
    admin = Principal(name="ops", admin=True, key_id="key-ops")
    for allowed in (owner, admin):
        job, _ = chat(pipeline, "hi", allowed, model=model)
        assert job.target.adapter is not None and job.target.adapter.name == model
    with pytest.raises(NotFoundError, match="does not exist"):
        chat(pipeline, "hi", other, model=model)
    job, _ = chat(pipeline, "hi", other, model="birds")  # a domain exposes it to every key that may use the domain
    assert job.target.adapter is not None and job.target.adapter.name == model
