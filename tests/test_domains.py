"""Domains through the real server and the openai client: adapters, knowledge, citations, trimming, scopes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from lorag.config import load_settings
from tests.conftest import ADMIN_KEY, BASE_NAME, USER_KEY, Models, Server, start_server

PLUGINS = Path(__file__).parent / "plugins"
LEGAL_KEY = "sk-legal-scoped-key"
NO_OVERRIDES_KEY = "sk-no-overrides-key"
MAX_MODEL_LEN = 512

LEGAL_DOCS = {
    "statutes.md": "# Deposits\n\nA landlord must return the tenancy deposit within 14 days of the end of the lease.\n\n"
                   "# Repairs\n\nThe landlord pays for structural repairs to the roof and walls.",
    "notice.txt": "A tenant gives one month of notice in writing before moving out of a rented flat.",
}
MEDICAL_DOCS = {
    "dosage.md": "# Paracetamol\n\nAdults may take at most 4 grams of paracetamol per day, in doses of 500 mg to 1 g.",
    "fever.txt": "A fever above 39 degrees in a small child needs a doctor on the same day.",
}
# Long enough that every retrieved chunk alone overflows the tiny model's 512-token window.
BIG_DOCS = {f"chapter{i}.txt": " ".join(f"Clause {i}.{j} says the archive keeps record {j} of volume {i} for "
                                         "ninety years in the cellar." for j in range(60)) for i in range(4)}

def tool_call(name: str, **arguments: Any) -> str:
    """A call in the hermes format, which the forced plugin makes the real model write."""
    return f"<tool_call>{json.dumps({'name': name, 'arguments': arguments})}</tool_call>"


DOMAINS = f"""
[knowledge.chunking]
chunk_size = 400
chunk_overlap = 0

[domains.legal]
description = "Tenancy law: landlords, tenants, leases, rent, deposits, notice and repairs."
adapter = "alpha"
system_prompt = "You answer questions about tenancy law."
[domains.legal.knowledge]
bases = ["legal-kb"]
top_k = 2

[domains.medical]
description = "Medicine: drugs, dosage, fever, symptoms and when to see a doctor."
adapter = "beta"
[domains.medical.knowledge]
bases = ["medical-kb"]
top_k = 2
[domains.medical.generation]
max_tokens_limit = 64

[domains.coder]
adapter = "gamma"

[domains.plain]

[domains.restricted]
api_keys = ["fixed"]

[domains.verbose]
[domains.verbose.knowledge]
bases = ["big-kb"]
top_k = 8

[routing]
fallback = "plain"

[plugins]
modules = {{ forced = "{PLUGINS / 'forced.py'}", toolbox = "{PLUGINS / 'toolbox.py'}" }}

[domains.agent]
adapter = "delta"
tools = {{ enabled = ["exchange_rate"], max_steps = 2 }}
[domains.agent.plugins]
enabled = ["forced", "toolbox"]
settings.forced.text = '{tool_call("exchange_rate", currency="EUR")}'

[domains.researcher]
tools = {{ enabled = ["search_knowledge"], max_steps = 1 }}
[domains.researcher.knowledge]
bases = ["legal-kb"]
[domains.researcher.plugins]
enabled = ["forced"]
settings.forced.text = '{tool_call("search_knowledge", query="tenancy deposit")}'

[domains.toolsonly]
tools = {{ enabled = ["exchange_rate"], max_steps = 1 }}
plugins = {{ enabled = ["toolbox"] }}

[domains.assistant]
[domains.assistant.plugins]
enabled = ["forced"]
settings.forced.text = '{tool_call("get_weather", city="Paris")}'
"""
EXTRA_KEYS = f"""  {{ key = "{LEGAL_KEY}", name = "legal-team", domains = ["legal"] }},
  {{ key = "{NO_OVERRIDES_KEY}", name = "fixed", overrides = false }},
"""


def write_corpus(root: Path, docs: dict[str, str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, text in docs.items():
        (root / name).write_text(text)
    return root


def build_knowledge(state_dir: Path, corpus_root: Path) -> None:
    """Knowledge bases in the server's state dir, built before it starts (it then owns the store)."""
    from lorag.knowledge.service import KnowledgeService

    settings = load_settings(overrides={"state_dir": str(state_dir), "knowledge.chunking.chunk_size": 400,
                                        "knowledge.chunking.chunk_overlap": 0})
    service = KnowledgeService.from_settings(settings)
    try:
        for kb, docs in (("legal-kb", LEGAL_DOCS), ("medical-kb", MEDICAL_DOCS), ("big-kb", BIG_DOCS)):
            service.create(kb)
            report = service.ingest_paths(kb, [str(write_corpus(corpus_root / kb, docs))])
            assert not report.failed, report.to_dict()
    finally:
        service.close()


@pytest.fixture(scope="module")
def domain_server(models: Models, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    workdir = tmp_path_factory.mktemp("domains")
    build_knowledge(workdir / "state", workdir / "corpus")
    srv = start_server(models, workdir, extra_config=DOMAINS, extra_keys=EXTRA_KEYS)
    yield srv
    srv.stop()


def api(server: Server, key: str = USER_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.api, api_key=key, max_retries=0, timeout=120)


def ask(client: openai.OpenAI, model: str, question: str, **extra: Any) -> tuple[str, dict[str, Any]]:
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                           max_tokens=12, temperature=0, **extra)
    return reply.choices[0].message.content or "", (reply.model_extra or {})["lorag"]


def test_models_lists_domains_with_their_adapter_and_knowledge(domain_server: Server) -> None:
    models = {m.id: (m.model_extra or {}) for m in api(domain_server).models.list().data}
    assert models["legal"]["lorag"]["adapter"] == "alpha"
    assert models["legal"]["lorag"]["knowledge_bases"] == ["legal-kb"]
    assert models["plain"]["lorag"]["adapter"] is None
    assert "auto" in models and BASE_NAME in models


def test_warmup_before_ready_so_the_first_retrieval_loads_nothing(domain_server: Server) -> None:
    ask(api(domain_server), "legal", "When must the landlord return the tenancy deposit?")
    events = domain_server.log_events()
    ready = next(n for n, e in enumerate(events) if e["event"] == "server_ready")
    before, after = events[:ready], events[ready:]
    warm = [e for e in before if e["event"] == "warmup"]
    assert {e["part"] for e in warm} == {"embeddings", "routing", "knowledge", "total"}
    assert {e["kb"] for e in warm if e["part"] == "knowledge"} == {"legal-kb", "medical-kb", "big-kb"}
    assert all(e["ok"] for e in warm)
    assert [e["event"] for e in before].count("kb.embedding.load") == 1
    first = next(n for n, e in enumerate(after) if e["event"] == "kb.retrieve")
    loaded = {"kb.embedding.load", "kb.keyword.build"} & {e["event"] for e in after[:first + 1]}
    assert not loaded, f"the first retrieval after /ready loaded {loaded}"


def test_two_domains_answer_with_their_own_adapter_and_citations(domain_server: Server) -> None:
    client = api(domain_server)
    legal_text, legal = ask(client, "legal", "When must the landlord return the tenancy deposit?")
    medical_text, medical = ask(client, "medical", "How many grams of paracetamol may adults take per day?")
    assert (legal["domain"], legal["adapter"]) == ("legal", "alpha@v1")
    assert (medical["domain"], medical["adapter"]) == ("medical", "beta@v1")
    assert Path(legal["citations"][0]["source"]).name == "statutes.md"
    assert "14 days" in legal["citations"][0]["snippet"]
    assert Path(medical["citations"][0]["source"]).name == "dosage.md"
    assert all(c["kb"] == "legal-kb" for c in legal["citations"])
    assert all(c["kb"] == "medical-kb" for c in medical["citations"])
    assert {"resolve_ms", "retrieve_ms", "prompt_ms", "generate_ms"} <= set(legal["timings"])
    # The same question through the two domains: different adapters, different answers.
    other_text, _ = ask(client, "medical", "When must the landlord return the tenancy deposit?")
    assert other_text != legal_text


def test_domain_without_knowledge_is_its_adapter_and_without_adapter_the_base(domain_server: Server) -> None:
    client = api(domain_server)
    question = "Tell me something."
    coder, info = ask(client, "coder", question)
    assert info["citations"] == [] and info["adapter"] == "gamma@v1"
    assert coder == ask(client, "gamma", question)[0]  # no system prompt, no context: exactly the adapter
    plain, info = ask(client, "plain", question)
    assert info["adapter"] is None
    assert plain == ask(client, BASE_NAME, question)[0]


def test_streamed_response_carries_citations_in_the_last_chunk(domain_server: Server) -> None:
    stream = api(domain_server).chat.completions.create(
        model="legal", messages=[{"role": "user", "content": "How much notice does a tenant give?"}],
        max_tokens=8, temperature=0, stream=True)
    chunks = list(stream)
    last = (chunks[-1].model_extra or {})["lorag"]
    assert last["domain"] == "legal"
    assert any(Path(c["source"]).name == "notice.txt" for c in last["citations"])


def test_huge_retrieved_context_is_trimmed_and_the_request_succeeds(domain_server: Server) -> None:
    reply = api(domain_server).chat.completions.create(
        model="verbose", messages=[{"role": "user", "content": "Which record does the archive keep in the cellar?"}],
        max_tokens=32, temperature=0)
    info = (reply.model_extra or {})["lorag"]
    assert reply.usage is not None
    assert reply.usage.prompt_tokens + 32 <= MAX_MODEL_LEN
    assert info["trimmed"]["context_chunks"] >= 1
    assert info["citations"], "the best chunk is kept (cut to fit) rather than dropped"
    assert info["citations"][0]["snippet"]


def test_a_conversation_too_long_on_its_own_is_a_clear_400(domain_server: Server) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        ask(api(domain_server), "verbose", "archive record " * 600)
    assert caught.value.code == "context_length_exceeded"
    assert "maximum context length is 512" in str(caught.value)


def test_domain_max_tokens_limit_and_bad_options_are_400s(domain_server: Server) -> None:
    client = api(domain_server)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="medical", messages=[{"role": "user", "content": "hi"}], max_tokens=65)
    assert "limit of 64" in str(caught.value)
    with pytest.raises(openai.BadRequestError) as caught:
        ask(client, "legal", "hi", extra_body={"lorag": {"topk": 3}})
    assert caught.value.param == "lorag.topk"


def test_overrides_change_retrieval_and_adapter_per_request(domain_server: Server) -> None:
    client = api(domain_server)
    _, info = ask(client, "legal", "When must the landlord return the deposit?",
                  extra_body={"lorag": {"no_retrieval": True}})
    assert info["citations"] == []
    _, info = ask(client, "legal", "When must the landlord return the deposit?",
                  extra_body={"lorag": {"top_k": 1, "adapter": "none"}})
    assert len(info["citations"]) == 1 and info["adapter"] is None
    with pytest.raises(openai.PermissionDeniedError):
        ask(api(domain_server, NO_OVERRIDES_KEY), "legal", "hi", extra_body={"lorag": {"top_k": 1}})


def test_auto_routes_and_says_where(domain_server: Server) -> None:
    client = api(domain_server)
    _, info = ask(client, "auto", "What is the maximum daily dose of paracetamol for adults?")
    assert info["domain"] == "medical" and info["route"]["confident"]
    _, info = ask(client, "auto", "qwzx vlorp")
    assert info["domain"] == "plain" and not info["route"]["confident"]


def test_a_domain_admits_only_the_keys_it_names(domain_server: Server) -> None:
    with pytest.raises(openai.PermissionDeniedError):
        ask(api(domain_server), "restricted", "hi")
    assert ask(api(domain_server, NO_OVERRIDES_KEY), "restricted", "hi")[1]["domain"] == "restricted"
    assert "restricted" not in {m.id for m in api(domain_server).models.list().data}


def test_keys_scoped_to_a_domain_cannot_reach_other_domains_or_their_knowledge(domain_server: Server) -> None:
    scoped = api(domain_server, LEGAL_KEY)
    _, info = ask(scoped, "legal", "When must the landlord return the deposit?")
    assert info["domain"] == "legal"
    for model in ("medical", BASE_NAME, "alpha"):
        with pytest.raises(openai.PermissionDeniedError):
            ask(scoped, model, "hi")
    with pytest.raises(openai.PermissionDeniedError):
        ask(scoped, "legal", "hi", extra_body={"lorag": {"knowledge_bases": ["medical-kb"]}})
    assert {m.id for m in scoped.models.list().data} == {"legal", "auto"}
    _, info = ask(scoped, "auto", "What is the maximum daily dose of paracetamol?")
    assert info["domain"] == "legal"  # the only domain it may use

    headers = {"authorization": f"Bearer {LEGAL_KEY}"}
    with httpx.Client(base_url=domain_server.url, headers=headers, timeout=60) as http:
        assert [kb["name"] for kb in http.get("/v1/knowledge").json()["data"]] == ["legal-kb"]
        refused = http.post("/v1/knowledge/medical-kb/query", json={"query": "paracetamol"})
        assert refused.status_code == 403 and refused.json()["error"]["type"] == "permission_error"
        assert http.post("/v1/knowledge/legal-kb,medical-kb/query", json={"query": "x"}).status_code == 403
        assert http.post("/v1/knowledge/legal-kb/query", json={"query": "deposit"}).status_code == 200
    with httpx.Client(base_url=domain_server.url, headers={"authorization": f"Bearer {ADMIN_KEY}"}) as http:
        assert len(http.get("/v1/knowledge").json()["data"]) == 3


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"],
                   "additionalProperties": False}}}


def test_server_side_tool_loop_runs_calls_feeds_results_back_and_stops_at_max_steps(domain_server: Server) -> None:
    client = api(domain_server)
    reply = client.chat.completions.create(model="agent", messages=[{"role": "user", "content": "EUR?"}],
                                           max_tokens=120, temperature=0)
    tools = (reply.model_extra or {})["lorag"]["tools"]
    assert [c["step"] for c in tools["calls"]] == [1, 2] and tools["stopped"] == "max_steps"
    assert all(json.loads(c["result"]) == {"currency": "EUR", "usd": 1.08} for c in tools["calls"])
    plain = client.chat.completions.create(model="coder", messages=[{"role": "user", "content": "EUR?"}],
                                           max_tokens=1, temperature=0)
    assert reply.usage and plain.usage
    # The last prompt holds both calls and their results: far longer than the question alone.
    assert reply.usage.prompt_tokens > plain.usage.prompt_tokens + 2 * 20


def test_search_knowledge_tool_reads_the_domains_knowledge(domain_server: Server) -> None:
    reply = api(domain_server).chat.completions.create(
        model="researcher", messages=[{"role": "user", "content": "deposit?"}], max_tokens=120, temperature=0,
        extra_body={"lorag": {"no_retrieval": True}})  # the model searches for itself
    tools = (reply.model_extra or {})["lorag"]["tools"]
    calls = tools["calls"]
    # One step's results are long in the tiny model's tokens: the loop stops cleanly rather than overflow.
    assert tools.get("stopped") in (None, "max_steps", "context_length")
    assert calls[0]["name"] == "search_knowledge"
    assert "14 days" in calls[0]["result"]


@pytest.mark.parametrize("stream", [False, True])
def test_client_side_tool_calls_come_back_to_the_client(domain_server: Server, stream: bool) -> None:
    client = api(domain_server)
    messages: list[Any] = [{"role": "user", "content": "Weather in Paris?"}]
    if not stream:
        reply = client.chat.completions.create(model="assistant", messages=messages, tools=[WEATHER_TOOL],
                                               max_tokens=120, temperature=0)
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls"
        call = (choice.message.tool_calls or [])[0]
    else:
        chunks = list(client.chat.completions.create(model="assistant", messages=messages, tools=[WEATHER_TOOL],
                                                     max_tokens=120, temperature=0, stream=True))
        finals = [c.choices[0] for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finals[-1].finish_reason == "tool_calls"
        call = (finals[-1].delta.tool_calls or [])[0]  # type: ignore[assignment]
    assert call.function and call.function.name == "get_weather"
    assert json.loads(call.function.arguments or "{}") == {"city": "Paris"}
    # The client runs the tool and sends the result back: the conversation goes on.
    messages += [{"role": "assistant", "content": None, "tool_calls": [
                     {"id": call.id, "type": "function",
                      "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                 {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
    follow_up = client.chat.completions.create(model="coder", messages=messages, max_tokens=4, temperature=0)
    assert follow_up.choices[0].finish_reason in ("stop", "length")


def test_tool_choice_forces_a_call_from_a_model_that_would_not_make_one(domain_server: Server) -> None:
    client = api(domain_server)
    messages: Any = [{"role": "user", "content": "Weather?"}]
    named = {"type": "function", "function": {"name": "get_weather"}}
    reply = client.chat.completions.create(model="coder", messages=messages, tools=[WEATHER_TOOL],
                                           tool_choice=named, max_tokens=60, temperature=0)  # type: ignore[arg-type]
    call = (reply.choices[0].message.tool_calls or [])[0]
    assert reply.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    assert json.loads(call.function.arguments)["city"] in ("Paris", "Rome")  # type: ignore[union-attr]
    reply = client.chat.completions.create(model="toolsonly", messages=messages, max_tokens=60, temperature=0,
                                           tool_choice={"type": "function", "function": {"name": "exchange_rate"}})
    calls = (reply.model_extra or {})["lorag"]["tools"]["calls"]
    assert calls and calls[0]["name"] == "exchange_rate" and "usd" in calls[0]["result"]
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="coder", messages=messages, tools=[WEATHER_TOOL], max_tokens=4,
                                       tool_choice={"type": "function", "function": {"name": "nope"}})
    assert caught.value.param == "tool_choice"
