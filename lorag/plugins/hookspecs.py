"""The hooks a lorag plugin can implement.

There are two kinds.

Request-path hooks (`request_received` ... `format_output`) run for the domains
that enable the plugin. lorag calls each enabled implementation itself, in the
domain's order, handing each one the previous one's result (a pipeline), instead
of letting pluggy call them all with the same arguments. That is why none of them
is `firstresult` and why wrapper implementations are refused for them: lorag needs
one call per plugin to give it its own settings and per-request state, to time
it, to name it when it fails, and to fail closed. Returning None means "no
change", so a plugin implements only what it needs and takes only the arguments it
uses (pluggy's rule). Raise `ContentBlocked` to refuse text; any other exception
is a plugin bug: lorag names the plugin and refuses the request rather than let
text through unfiltered.

Registration hooks (`register_*`, `settings_model`) run once when plugins load,
for every loaded plugin, whatever the domains. An exception there marks the
plugin broken (listed by `lorag plugins list`; domains that enable it refuse
requests) and the rest of lorag keeps working.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import click
    from pydantic import BaseModel

    from lorag.plugins.types import PluginContext, Replace, Verdict

PROJECT = "lorag"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

# Hooks lorag calls one implementation at a time, per request (see the module docstring).
REQUEST_HOOKS = (
    "request_received",
    "context_retrieved",
    "sampling_params",
    "output_chunk",
    "output_complete",
    "format_output",
)


@hookspec
def request_received(messages: list[dict[str, Any]], ctx: PluginContext) -> list[dict[str, Any]] | None:
    """Inspect, redact or block the chat messages before anything else sees them.

    Return a new message list (same shape: dicts with "role" and "content") or
    None to leave them as they are (never mutate the list you got); raise
    `ContentBlocked(message)` to refuse the request (HTTP 400, code "content_filter").
    Pipeline, not firstresult: every guard must see the input, and each
    sees what the previous one left (a redaction is not undone by the next plugin).
    """


@hookspec
def context_retrieved(query: str, chunks: list[Any], ctx: PluginContext) -> list[Any] | None:
    """Drop, rerank or redact retrieved chunks before they go into the prompt.

    `chunks` are knowledge-base hits (objects with kb, source, location, text,
    score, metadata). Return the chunks to keep, in the order to use them, or None
    to keep them all. Never change a chunk in place (the retriever may share it):
    return a copy, `dataclasses.replace(chunk, text=...)`. Pipeline, not firstresult:
    a reranker and a redactor compose.
    """


@hookspec
def sampling_params(
    params: dict[str, Any], response_format: dict[str, Any] | None, ctx: PluginContext
) -> dict[str, Any] | None:
    """Change the engine's sampling parameters, e.g. add a structured-output constraint.

    `params` are keyword arguments for `vllm.SamplingParams` (for structured output
    set params["structured_outputs"] to a `vllm.sampling_params.StructuredOutputsParams`);
    `response_format` is the request's OpenAI response_format, or None. Return the
    new dict or None. Pipeline: each plugin sees the constraints earlier ones added.
    """


@hookspec
def output_chunk(window: str, start: int, final: bool, ctx: PluginContext) -> Iterable[Replace] | None:
    """Filter generated text on its way to the client, streamed or not.

    lorag holds back the last `hold_back_chars` of the output and calls this hook
    with a window: `window[:start]` is context already sent, `window[start:]` is
    not sent yet. Return `Replace(start, end, text)` edits (indexes into `window`)
    for every match you see, or raise `ContentBlocked(message)`; the answer then
    ends with finish_reason "content_filter". lorag applies an edit only when the
    text after it is known: an edit that reaches past what it sends now, or to the
    end of a window that is not `final`, makes it hold the text back and ask again
    with more, so a secret split across chunks is caught whole. The windows do not
    depend on how the engine chunked the text: streamed and non-streamed answers
    come out identical. A match must be recognisable from its start within
    `hold_back_chars` (a settings model can ask for more with a `min_hold_back_chars`
    property); for a pattern that needs its end to match at all, also report the
    beginning you can see when it runs to the end of a non-`final` window. `final`
    matters for blocking: while it is False, a match that touches the end of the
    window may be the start of a longer word (`class` in `classic`). All
    enabled plugins see the same raw window and their edits are merged, so one
    hold-back serves them all; this runs every few dozen characters, keep it cheap.
    """


@hookspec
def output_complete(text: str, ctx: PluginContext) -> Verdict | None:
    """Validate the whole answer: return None (pass) or `Verdict.fix/retry/refuse`.

    Runs in the domain's order on the filtered text. A fix replaces the text and the
    next validator sees the fixed text; the first retry or refuse stops the chain
    (a firstresult for decisive verdicts only: every validator gets a say on a text
    that is going out). lorag retries up to `max_retries` times with the message
    as a user turn, then answers with HTTP 422 "output_validation_failed". Call
    `ctx.hold_output()` earlier if you may fix or retry a streamed answer: text
    already sent cannot be taken back (without it lorag accepts only a fix that
    appends, and turns a retry into a refuse).
    """


@hookspec
def format_output(
    text: str, response: dict[str, Any], citations: list[Any], ctx: PluginContext
) -> tuple[str, dict[str, Any]] | None:
    """Shape the final text and the response object (markdown, plain, JSON, sources list).

    `response` is the dict lorag will send (put extras under response["lorag"]);
    `citations` are the sources numbered [1], [2], ... in the prompt. Return
    (text, response) or None. Pipeline, last step before the client. For an answer
    that was streamed without `ctx.hold_output()` only appending to the text is
    possible; hold the output if your formatter rewrites it.
    """


@hookspec
def register_commands(cli: click.Group) -> None:
    """Add commands to the `lorag` CLI, e.g. `lorag legal ...` (cli.command / cli.add_command)."""


@hookspec
def register_tools(register: Callable[..., None]) -> None:
    """Offer functions the models can call: register(fn, name=None, description=None).

    The JSON schema of the parameters comes from the type hints (str, int, float,
    bool, lists, Literal, optional types), the description from the docstring's
    first paragraph. A parameter named `ctx` is not shown to the model: lorag fills
    it with the request's PluginContext (domain, settings, `ctx.search_knowledge`).
    A plugin's tools are offered to the domains that enable the plugin, lorag's own
    (`search_knowledge`) to every domain; a domain lists the ones its model may call
    in `[domains.<name>.tools] enabled`.
    """


@hookspec
def register_knowledge_readers(register: Callable[[str, Any], None]) -> None:
    """Teach knowledge-base ingestion a file type: register(".ext", reader).

    `reader` is a llama-index `BaseReader` subclass (or a callable returning one
    instance); the knowledge part uses it for files with that extension, one segment
    per Document it returns (metadata "page", "section" and "title" are kept for
    citations). lorag's own readers register the same way (the built-in
    `file_readers` plugin); registering one of their extensions replaces lorag's
    reader, while two plugins claiming one extension is an error.
    """


@hookspec
def settings_model() -> type[BaseModel] | None:
    """Return the pydantic model your settings in lorag.toml must match.

    lorag validates `[plugins.settings.<name>]` merged with each domain's
    `[plugins.domains.<domain>.settings.<name>]` against it when the server starts,
    so a typo fails at start-up with the key's path, and hooks get `ctx.settings`
    as an instance of it (use `extra="forbid"` to catch typos). Called per plugin
    (each answers for itself).
    """
