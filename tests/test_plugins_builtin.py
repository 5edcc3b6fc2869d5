"""Built-in plugins through the facade: blocklist, json_schema, formatting."""

from __future__ import annotations

import json

import pytest
import yaml

from lorag.config import ConfigError
from lorag.errors import LoragError
from lorag.plugins import ContentBlocked
from lorag.plugins.builtin.formatting import plain
from lorag.plugins.builtin.json_schema import json_problem, requested_schema
from tests.plugins.host import hooks_for, make_host, run_stream

# -- blocklist -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def blocklist_host():
    return make_host(domains={
        "secretive": {"enabled": ["blocklist"], "settings": {"blocklist": {
            "terms": ["Project Falcon", "class"], "patterns": [r"\bTKT-\d{5}\b"],
            "message": "Blocked: sensitive topic."}}},
        "open": {"enabled": []},
    }, hold_back_chars=16)


def test_blocklist_refuses_input(blocklist_host) -> None:
    with pytest.raises(ContentBlocked, match="refused by the content filter"):
        hooks_for(blocklist_host, "secretive").request_received(
            [{"role": "user", "content": "tell me about project   FALCON"}])
    hooks_for(blocklist_host, "open").request_received([{"role": "user", "content": "Project Falcon"}])


def test_blocklist_drops_context_chunks(blocklist_host) -> None:
    chunks = [{"text": "Project Falcon budget"}, {"text": "public roadmap"}]
    assert hooks_for(blocklist_host, "secretive").context_retrieved("q", chunks) == [{"text": "public roadmap"}]


@pytest.mark.parametrize("size", [1, 2, 5, 13, 1000])
def test_blocklist_stops_output_at_any_chunking(blocklist_host, size: int) -> None:
    text = "The plan, internally called Project Falcon, starts soon and then more words follow."
    chunks = [text[i:i + size] for i in range(0, len(text), size)]
    sent, blocked = run_stream(hooks_for(blocklist_host, "secretive"), chunks)
    assert blocked == "Blocked: sensitive topic."
    assert "Falcon" not in sent and "The plan, internally called Project Falcon"[:len(sent)] == sent
    assert (sent, blocked) == run_stream(hooks_for(blocklist_host, "secretive"), [text])


def test_blocklist_whole_words_and_patterns(blocklist_host) -> None:
    for text in ("A classic example of classification.", "ticket TKT-123456 is long"):
        assert run_stream(hooks_for(blocklist_host, "secretive"), [text]) == (text, None)
    # a term at a window edge is not mistaken for a prefix of a longer word, at any split
    text = "x" * 30 + " classical music"
    for cut in range(1, len(text)):
        assert run_stream(hooks_for(blocklist_host, "secretive"), [text[:cut], text[cut:]])[1] is None
    assert run_stream(hooks_for(blocklist_host, "secretive"), ["see TKT-12345 now"])[1]


def test_blocklist_raises_the_hold_back_for_long_terms() -> None:
    term = "a very long confidential phrase that is longer than the window"
    host = make_host(default=["blocklist"], settings={"blocklist": {"terms": [term]}}, hold_back_chars=16)
    assert host.plan("any").hold_back >= len(term)
    text = "y" * 100 + " " + term + " and the rest"
    sent, blocked = run_stream(hooks_for(host), [text[i:i + 3] for i in range(0, len(text), 3)])
    assert blocked and "confidential" not in sent


def test_blocklist_settings_are_validated() -> None:
    with pytest.raises(ConfigError, match=r"plugins\.settings\.blocklist: patterns: .*not a valid regular"):
        make_host(default=["blocklist"], settings={"blocklist": {"patterns": ["(unclosed"]}})


# -- json_schema --------------------------------------------------------------------

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 1}},
          "required": ["ok"], "additionalProperties": False}


def test_requested_schema_from_response_format_or_domain() -> None:
    assert requested_schema(None, None) == (False, None)
    assert requested_schema({"type": "text"}, SCHEMA) == (True, SCHEMA)
    assert requested_schema({"type": "json_object"}, None) == (True, None)
    assert requested_schema({"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}, None) == \
        (True, SCHEMA)
    with pytest.raises(LoragError, match="not a valid JSON Schema") as err:
        requested_schema({"type": "json_schema", "json_schema": {"schema": {"type": "nope"}}}, None)
    assert err.value.param == "response_format"
    with pytest.raises(LoragError, match="not supported"):
        requested_schema({"type": "xml"}, None)


def test_json_problem_names_the_path() -> None:
    assert json_problem('{"ok": true}', SCHEMA) is None
    assert json_problem('{"ok": tr', SCHEMA).startswith("not JSON")
    assert json_problem('{"ok": true, "n": 0}', SCHEMA) == "at n: 0 is less than the minimum of 1"
    assert json_problem("[1]", None) == "a JSON object was required"


def test_json_schema_retries_then_passes() -> None:
    host = make_host(default=["json_schema"], domains={"strict": {
        "enabled": ["json_schema"], "settings": {"json_schema": {"schema": SCHEMA}}}})
    hooks = hooks_for(host, "strict")
    params = hooks.sampling_params({}, None)  # the domain's schema applies without a response_format
    assert "root ::=" in params["structured_outputs"].grammar and hooks.holds_output
    stream = hooks.output_stream()
    assert stream.feed('{"ok": 1}') == "" and stream.finish() == '{"ok": 1}'
    verdict = hooks.output_complete(stream.text)
    assert verdict.action == "retry" and "at ok: 1 is not of type 'boolean'" in (verdict.message or "")
    stream = hooks.output_stream()
    stream.feed('{"ok": true}')
    stream.finish()
    assert hooks.output_complete(stream.text).action == "pass"
    # a request without JSON is left alone
    plain_hooks = hooks_for(host, "other")
    plain_hooks.sampling_params({}, None)
    assert plain_hooks.output_complete("just text").action == "pass"


def test_json_schema_settings_reject_an_invalid_schema() -> None:
    with pytest.raises(ConfigError, match="schema is not a valid JSON Schema"):
        make_host(default=["json_schema"], settings={"json_schema": {"schema": {"type": 12}}})


# -- formatting ---------------------------------------------------------------------

CITATIONS = [{"source": "lease.md", "location": "§2"}, {"source": "statute.pdf", "location": "p. 4"},
             {"source": "faq.html"}]
ANSWER = "**Notice** is thirty days [1], see `§2`; a [link](http://x.test) and [2]. Unknown [9]."


def formatted(style: str, sources: str = "all", chunks: list[str] | None = None) -> tuple[str, dict]:
    host = make_host(default=["formatting"], settings={"formatting": {"style": style, "sources": sources}})
    hooks = hooks_for(host)
    hooks.request_received([])
    sent, _ = run_stream(hooks, chunks or [ANSWER])
    text, response = hooks.format(sent, {"id": "x"}, CITATIONS)
    assert text.startswith(sent)  # what was streamed is never contradicted
    return text, response


def test_markdown_appends_sources_and_streams() -> None:
    text, response = formatted("markdown", chunks=[ANSWER[i:i + 4] for i in range(0, len(ANSWER), 4)])
    assert text == ANSWER + "\n\n**Sources**\n\n[1] lease.md, §2  \n[2] statute.pdf, p. 4  \n[3] faq.html"
    assert response == {"id": "x", "lorag": {"format": "markdown"}}


def test_only_cited_sources() -> None:
    text, _ = formatted("markdown", sources="cited")
    assert text.endswith("[1] lease.md, §2  \n[2] statute.pdf, p. 4") and "faq.html" not in text


def test_plain_strips_markdown_and_holds_output() -> None:
    host = make_host(default=["formatting"], settings={"formatting": {"style": "plain"}})
    hooks = hooks_for(host)
    hooks.request_received([])
    assert hooks.holds_output
    stream = hooks.output_stream()
    assert stream.feed(ANSWER) == ""
    text, _ = hooks.format(stream.finish(), {}, CITATIONS)
    assert text.startswith("Notice is thirty days [1], see §2; a link (http://x.test) and [2].")
    assert text.endswith("Sources:\n[1] lease.md, §2\n[2] statute.pdf, p. 4\n[3] faq.html")
    assert plain("# Title\n> quote\n* item\n```py\ncode\n```") == "Title\nquote\n- item\ncode\n"


def test_json_and_yaml() -> None:
    host = make_host(default=["formatting"], settings={"formatting": {"style": "json"}})
    hooks = hooks_for(host)
    hooks.request_received([])
    text, response = hooks.format('{"ok": true}', {}, CITATIONS[:1])
    assert json.loads(text) == {"ok": True, "sources": [{"n": 1, "source": "lease.md, §2"}]}
    assert response["lorag"]["format"] == "json"
    host = make_host(default=["formatting"], settings={"formatting": {"style": "yaml", "sources": "none"}})
    text, _ = hooks_for(host).format("just words", {}, CITATIONS)
    assert yaml.safe_load(text) == {"answer": "just words"}
