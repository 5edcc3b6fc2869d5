"""Every hook is documented and tested (datasette's rule), and each behaves as its docstring says."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner
from pydantic import BaseModel, ConfigDict

from lorag.config import ConfigError
from lorag.knowledge.retrieval import Hit
from lorag.plugins import ContentBlocked, PluginContext, Replace, Verdict, hookimpl
from lorag.plugins.cli import add_plugin_commands, hook_specs, plugins_group
from lorag.plugins.errors import PluginError
from lorag.plugins.hookspecs import REQUEST_HOOKS
from lorag.plugins.manager import new_plugin_manager
from tests.plugins.host import hooks_for, make_host, run_stream

DOCS = Path(__file__).resolve().parent.parent / "docs" / "plugins.md"
HOOKS = sorted(name for name in dir(new_plugin_manager().hook) if not name.startswith("_"))


@pytest.mark.parametrize("hook", HOOKS)
def test_plugin_hooks_are_documented(hook: str) -> None:
    """docs/plugins.md has a section per hook whose heading is its exact signature."""
    content = DOCS.read_text(encoding="utf-8")
    caller = getattr(new_plugin_manager().hook, hook)
    signature = f"{hook}({', '.join(caller.spec.argnames)})"
    headings = re.findall(r"^#{2,4} `?([^\n`]+)`?$", content, re.M)
    assert signature in headings, f"docs/plugins.md needs a heading: ### {signature}"


@pytest.mark.parametrize("hook", HOOKS)
def test_the_hooks_docstring_is_the_contract_the_docs_link_to_and_the_cli_prints(hook: str) -> None:
    """docs/plugins.md points each hook at its docstring instead of repeating it."""
    section = DOCS.read_text(encoding="utf-8").split(f"### {hook}(")[1].split("\n### ")[0].split("\n## ")[0]
    assert "(../lorag/plugins/hookspecs.py)" in section
    signature, doc = hook_specs()[hook]
    assert len(doc.split()) > 8 and doc.split("\n")[0] not in section
    printed = CliRunner().invoke(plugins_group, ["hooks", hook])
    assert printed.exit_code == 0 and printed.output.startswith(signature) and doc.split("\n")[0] in printed.output


@pytest.mark.parametrize("hook", HOOKS)
def test_plugin_hooks_have_tests(hook: str) -> None:
    """Every hook is named by a test_hook_* test in this module."""
    assert any(hook in name for name in globals() if name.startswith("test_hook_")), \
        f"Plugin hook is missing tests: {hook}"


def test_request_hooks_are_specs() -> None:
    assert set(REQUEST_HOOKS) <= set(HOOKS)
    assert {h for h in HOOKS if h not in REQUEST_HOOKS} == {
        "register_commands", "register_tools", "register_knowledge_readers", "settings_model"}


# -- request path ------------------------------------------------------------------


class Suffix:
    """Appends its tag to the last message: shows the order the pipeline ran in."""

    def __init__(self, tag: str) -> None:
        self.tag = tag

    @hookimpl
    def request_received(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        last = messages[-1]
        return [*messages[:-1], {**last, "content": last["content"] + self.tag}]


def test_hook_request_received_runs_in_the_domains_order_each_seeing_the_last() -> None:
    host = make_host({"a": Suffix("A"), "b": Suffix("B")}, domains={"d": {"enabled": ["b", "a"]}})
    out = hooks_for(host).request_received([{"role": "user", "content": "hi "}])
    assert out == [{"role": "user", "content": "hi BA"}]


def test_hook_request_received_tryfirst_moves_an_implementation_to_the_front() -> None:
    class First:
        @hookimpl(tryfirst=True)
        def request_received(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
            return [{**messages[0], "content": messages[0]["content"] + "F"}]

    host = make_host({"a": Suffix("A"), "f": First()}, domains={"d": {"enabled": ["a", "f"]}})
    assert hooks_for(host).request_received([{"role": "user", "content": ""}])[0]["content"] == "FA"


def test_hook_request_received_blocks_with_the_plugins_message() -> None:
    class Guard:
        @hookimpl
        def request_received(self, messages: list[dict[str, Any]]) -> None:
            if "forbidden" in messages[-1]["content"]:
                raise ContentBlocked("No forbidden things here.")

    host = make_host({"guard": Guard()}, default=["guard"])
    hooks_for(host).request_received([{"role": "user", "content": "fine"}])
    with pytest.raises(ContentBlocked) as err:
        hooks_for(host).request_received([{"role": "user", "content": "forbidden"}])
    assert err.value.message == "No forbidden things here." and err.value.plugin == "guard"
    assert err.value.status_code == 400 and err.value.code == "content_filter"


def test_hook_request_received_returning_garbage_is_a_named_error() -> None:
    class Sloppy:
        @hookimpl
        def request_received(self) -> str:
            return "oops"

    host = make_host({"sloppy": Sloppy()}, default=["sloppy"])
    with pytest.raises(PluginError, match="Plugin 'sloppy' returned str from request_received"):
        hooks_for(host).request_received([{"role": "user", "content": "x"}])


def test_hook_context_retrieved_drops_and_reranks_chunks() -> None:
    class Rerank:
        @hookimpl
        def context_retrieved(self, query: str, chunks: list[Hit]) -> list[Hit]:
            kept = [c for c in chunks if c.score >= 0.5]
            return sorted(kept, key=lambda c: query in c.text, reverse=True)

    hits = [Hit("kb", "a.md", "p1", "nothing", 0.9), Hit("kb", "b.md", "p2", "lease terms", 0.6),
            Hit("kb", "c.md", "p3", "lease", 0.1)]
    host = make_host({"rerank": Rerank()}, default=["rerank"])
    out = hooks_for(host).context_retrieved("lease", hits)
    assert [c.source for c in out] == ["b.md", "a.md"]


def test_hook_sampling_params_pipeline_and_json_schema_constraint() -> None:
    from vllm.sampling_params import StructuredOutputsParams

    class Stop:
        @hookimpl
        def sampling_params(self, params: dict[str, Any]) -> dict[str, Any]:
            return {**params, "stop": ["\n\n"]}

    host = make_host({"stop": Stop()}, default=["stop", "json_schema"])
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    hooks = hooks_for(host)
    params = hooks.sampling_params({"max_tokens": 8}, {"type": "json_schema", "json_schema": {"name": "x",
                                                                                           "schema": schema}})
    assert params["stop"] == ["\n\n"] and params["max_tokens"] == 8
    constraint = params["structured_outputs"]
    # compact (the default): xgrammar's grammar for the schema, no free whitespace
    assert isinstance(constraint, StructuredOutputsParams) and "root ::=" in (constraint.grammar or "")
    assert hooks.holds_output  # a validator that may retry holds the answer
    loose = make_host(default=["json_schema"], settings={"json_schema": {"compact": False}})
    params = hooks_for(loose).sampling_params({}, {"type": "json_schema", "json_schema": {"schema": schema}})
    assert params["structured_outputs"].json == schema
    plain = hooks_for(host).sampling_params({"max_tokens": 8}, None)
    assert "structured_outputs" not in plain


class CodeFilter:
    """Replaces CODE-dddd: reports every match, lorag decides when it is safe to apply."""

    pattern = re.compile(r"CODE-\d{4}(?!\d)")

    @hookimpl
    def output_chunk(self, window: str, start: int) -> list[Replace]:
        return [Replace(m.start(), m.end(), "[code]") for m in self.pattern.finditer(window) if m.end() > start]


def test_hook_output_chunk_catches_a_match_split_across_every_chunk_boundary() -> None:
    host = make_host({"codes": CodeFilter()}, default=["codes"], hold_back_chars=16)
    text = "first CODE-1234 then " + "x" * 40 + " CODE-98765 and CODE-5555."
    whole, _ = run_stream(hooks_for(host), [text])
    assert whole == "first [code] then " + "x" * 40 + " CODE-98765 and [code]."
    for size in range(1, 12):
        chunks = [text[i:i + size] for i in range(0, len(text), size)]
        assert run_stream(hooks_for(host), chunks) == (whole, None)


def test_hook_output_chunk_block_and_crash_stop_the_stream() -> None:
    class Stopper:
        @hookimpl
        def output_chunk(self, window: str) -> None:
            if "stop" in window:
                raise ContentBlocked("stopped")
            if "boom" in window:
                raise ValueError("kaboom")

    host = make_host({"stopper": Stopper()}, default=["stopper"], hold_back_chars=8)
    assert run_stream(hooks_for(host), ["all good ", "here"]) == ("all good here", None)
    sent, blocked = run_stream(hooks_for(host), ["a" * 40, " then stop"])
    assert blocked == "stopped" and "stop" not in sent
    sent, blocked = run_stream(hooks_for(host), ["a" * 40, " then boom"])
    assert blocked and "Plugin 'stopper' failed in output_chunk: ValueError: kaboom" in blocked
    assert "boom" not in sent


def test_hook_output_complete_fix_then_retry_then_refuse() -> None:
    class Upper:
        @hookimpl
        def output_complete(self, text: str) -> Verdict | None:
            return Verdict.fix(text.upper()) if text.islower() else None

    class NoBad:
        @hookimpl
        def request_received(self, ctx: PluginContext) -> None:
            ctx.hold_output()

        @hookimpl
        def output_complete(self, text: str, ctx: PluginContext) -> Verdict | None:
            if "BAD" in text:
                return Verdict.retry("no bad words") if ctx.attempt < 1 else Verdict.refuse("still bad")
            return None

    host = make_host({"upper": Upper(), "nobad": NoBad()}, default=["upper", "nobad"])
    hooks = hooks_for(host)
    hooks.request_received([])
    assert hooks.output_complete("fine") == Verdict("fix", "FINE", None, "upper")
    hooks.output_stream()
    verdict = hooks.output_complete("bad")
    assert (verdict.action, verdict.message, verdict.plugin) == ("retry", "no bad words", "nobad")
    hooks.output_stream()  # the retry
    assert hooks.output_complete("bad").action == "refuse"
    assert "after 2 retries" in hooks.rejection(verdict).message


def test_hook_output_complete_cannot_retry_text_already_streamed() -> None:
    class Late:
        @hookimpl
        def output_complete(self) -> Verdict:
            return Verdict.retry("again")

    host = make_host({"late": Late()}, default=["late"])
    hooks = hooks_for(host)
    run_stream_hooks = hooks.output_stream()
    run_stream_hooks.feed("already sent")
    run_stream_hooks.finish()
    verdict = hooks.output_complete("already sent")
    assert verdict.action == "refuse" and "already sent" in (verdict.message or "")


def test_hook_format_output_pipeline_and_append_only_when_streamed() -> None:
    class Footer:
        @hookimpl
        def format_output(self, text: str, response: dict[str, Any]) -> tuple[str, dict[str, Any]]:
            response.setdefault("lorag", {})["footer"] = True
            return text + "\n-- footer", response

    class Rewriter:
        @hookimpl
        def format_output(self, text: str, response: dict[str, Any]) -> tuple[str, dict[str, Any]]:
            return text.upper(), response

    host = make_host({"footer": Footer(), "rewriter": Rewriter()},
                     domains={"f": {"enabled": ["footer"]}, "r": {"enabled": ["footer", "rewriter"]}})
    hooks = hooks_for(host, "f")
    stream = hooks.output_stream()
    sent = stream.feed("hello") + stream.finish()
    text, response = hooks.format(sent, {}, [])
    assert text == "hello\n-- footer" and response == {"lorag": {"footer": True}}
    hooks = hooks_for(host, "r")
    stream = hooks.output_stream()
    stream.feed("hello")
    stream.finish()
    with pytest.raises(PluginError, match="rewrote an answer that was already streamed"):
        hooks.format("hello", {}, [])


# -- registration ------------------------------------------------------------------


def test_hook_register_commands_adds_commands_to_the_cli() -> None:
    class Commands:
        @hookimpl
        def register_commands(self, cli: click.Group) -> None:
            @cli.command()
            def hello() -> None:
                """Say hello."""
                click.echo("hello from a plugin")

    class Broken:
        @hookimpl
        def register_commands(self, cli: click.Group) -> None:
            raise RuntimeError("no commands today")

    host = make_host({"commands": Commands(), "broken": Broken()})

    @click.group()
    def root() -> None:
        pass

    runner = CliRunner()
    add_plugin_commands(root, host.loaded)
    result = runner.invoke(root, ["hello"])
    assert result.exit_code == 0 and result.output == "hello from a plugin\n"


def test_hook_register_tools_schema_from_type_hints() -> None:
    def lookup(term: str, limit: int = 3, exact: bool | None = None) -> list[str]:
        """Look a term up in the glossary.

        More details that are not part of the description.
        """
        return [term] * limit

    class Tools:
        @hookimpl
        def register_tools(self, register: Any) -> None:
            register(lookup)

    host = make_host({"tools": Tools()}, domains={"with": {"enabled": ["tools"]}})
    tool = host.tools["lookup"]
    assert tool.description == "Look a term up in the glossary."
    assert tool.parameters["required"] == ["term"]
    assert tool.parameters["properties"]["limit"] == {"type": "integer"}
    assert tool.call({"term": "x", "limit": 2}) == ["x", "x"]
    with pytest.raises(Exception, match="invalid arguments"):
        tool.call({"limit": 2})
    # A plugin's tools only where it is enabled; lorag's own (search_knowledge) everywhere.
    assert [t.name for t in hooks_for(host, "with").tools] == ["search_knowledge", "lookup"]
    assert [t.name for t in hooks_for(host, "without").tools] == ["search_knowledge"]


def test_hook_register_knowledge_readers_by_extension() -> None:
    class Reader:
        pass

    class Readers:
        @hookimpl
        def register_knowledge_readers(self, register: Any) -> None:
            register("LAW", Reader)

    host = make_host({"readers": Readers()})
    assert host.loaded.knowledge_readers[".law"] == ("readers", Reader)
    assert host.loaded.knowledge_readers[".md"][0] == "file_readers"  # lorag's own, through the same hook


def test_a_plugin_reader_replaces_a_builtin_one_but_two_plugins_clash() -> None:
    class PdfReader:
        pass

    class BetterPdf:
        @hookimpl
        def register_knowledge_readers(self, register: Any) -> None:
            register(".pdf", PdfReader)

    host = make_host({"better_pdf": BetterPdf(), "other_pdf": BetterPdf()})
    assert host.loaded.knowledge_readers[".pdf"] == ("better_pdf", PdfReader)
    assert host.records["other_pdf"].status == "broken"
    assert "already registered by 'better_pdf'" in (host.records["other_pdf"].error or "")


def test_a_tool_that_takes_ctx_gets_the_requests_context_and_the_model_never_sees_it() -> None:
    def where(note: str, ctx: PluginContext) -> str:
        """Say which domain asked."""
        return f"{note} from {ctx.domain} ({ctx.settings['unit']})"

    class Tools:
        @hookimpl
        def register_tools(self, register: Any) -> None:
            register(where)

    host = make_host({"tools": Tools()}, settings={"tools": {"unit": "km"}}, domains={"maps": {"enabled": ["tools"]}})
    tool = host.tools["where"]
    assert tool.takes_context and "ctx" not in tool.parameters["properties"]
    hooks = hooks_for(host, "maps")
    bound = tool.bound(hooks.context("tools"))
    assert bound.call({"note": "hi"}) == "hi from maps (km)"


def test_hook_settings_model_validates_settings_with_the_keys_path() -> None:
    class Settings(BaseModel):
        model_config = ConfigDict(extra="forbid")
        threshold: float = 0.5

    class WithSettings:
        @hookimpl
        def settings_model(self) -> type[BaseModel]:
            return Settings

        @hookimpl
        def request_received(self, ctx: PluginContext) -> None:
            ctx.state["seen"] = ctx.settings.threshold

    host = make_host({"ws": WithSettings()}, settings={"ws": {"threshold": 0.2}},
                     domains={"d": {"enabled": ["ws"], "settings": {"ws": {"threshold": 0.9}}},
                              "e": {"enabled": ["ws"]}})
    for domain, expected in (("d", 0.9), ("e", 0.2)):
        hooks = hooks_for(host, domain)
        hooks.request_received([])
        assert hooks.context("ws").state["seen"] == expected
    with pytest.raises(ConfigError, match=r"plugins\.domains\.d\.settings\.ws.*threshold"):
        make_host({"ws": WithSettings()}, domains={"d": {"enabled": ["ws"], "settings": {"ws": {"threshold": "x"}}}})
    with pytest.raises(ConfigError, match=r"plugins\.settings\.ws.*typo.*unknown key"):
        make_host({"ws": WithSettings()}, default=["ws"], settings={"ws": {"typo": 1}})
