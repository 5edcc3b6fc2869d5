"""What the serving core calls on every request: RequestHooks, from PluginHost.for_request.

    host = PluginHost.from_settings(settings)            # once, at start-up
    hooks = host.for_request(request_id=rid, domain=model_name)   # PluginUnavailable -> 503
    messages = hooks.request_received(messages)          # ContentBlocked -> 400 content_filter
    chunks = hooks.context_retrieved(query, chunks)
    kwargs = hooks.sampling_params(kwargs, request.response_format)   # then SamplingParams(**kwargs)
    for attempt in range(hooks.max_retries + 1):
        stream = hooks.output_stream(index)              # per choice, per attempt
        for delta in generation:                         # streamed or not: the same calls
            send(stream.feed(delta))
            if stream.blocked: stop this choice; send(message), finish_reason "content_filter"
        send(stream.finish())                            # then check stream.blocked again
        verdict = hooks.output_complete(stream.text, index)
        if verdict.action != "retry": break
        messages += [assistant: stream.text, user: verdict.message]; generate again
    else: raise hooks.rejection(verdict)                 # OutputRejected, HTTP 422
    refuse: send(verdict.message), finish_reason "content_filter"
    pass/fix: text, extras = hooks.format(verdict.text, {"lorag": {...}}, citations, index)
              send(text[len(sent):])                     # streamed: only what is new

Contract:
- A non-streamed completion goes through output_stream too (feed the whole text,
  then finish), so both modes give identical text; `stream.text` is all of it.
- Blocked: what was sent (identical in both modes, blocks included) followed by
  the message, finish_reason "content_filter".
- When a plugin called `ctx.hold_output()` (json_schema, formatting other than
  markdown, validators that may retry), feed() returns "" and finish() returns
  everything, so a validator can fix, retry or reformat before anything is sent.
  Otherwise a fix or a format may only append to the text sent (checked here) and
  a retry of text already sent becomes a refuse.
- Plugins fail closed: a crash or timeout (`hook_timeout_s`, enforced here) in an
  input, context or sampling hook raises PluginError (HTTP 500, names the plugin);
  in an output filter it blocks the stream; in a validator it refuses; in a
  formatter it raises PluginError. A domain that enables a plugin that is missing
  or failed to load gets PluginUnavailable (HTTP 503) from `for_request`; other
  domains are not affected. Deliberate errors (ContentBlocked, any LoragError a
  plugin raises, e.g. a bad response_format) pass through with their status.
- Every hook has an async twin (`arequest_received`, ..., `afeed`, `afinish`,
  `aoutput_complete`, `aformat`) that the serving core awaits: where a third-party
  plugin implements the hook, the call runs in the hooks lane (lorag.lanes), so a slow
  plugin delays only its own request, never another domain's stream; built-ins run inline.
- Per-chunk cost: feed() is an append and a compare except every `hold_back/2`
  characters, when the enabled filters scan one window.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from lorag import lanes
from lorag.errors import LoragError
from lorag.logging import get_logger
from lorag.plugins.errors import OutputRejected, PluginError
from lorag.plugins.invoke import Impl, Invoker
from lorag.plugins.stream import OutputStream
from lorag.plugins.tools import Tool
from lorag.plugins.types import KnowledgeSearch, PluginContext, Replace, RequestState, Verdict

log = get_logger("lorag.plugins")
T = TypeVar("T")
OUTPUT_HOOKS = ("output_chunk", "output_complete", "format_output")

@dataclass
class DomainPlan:
    """Which implementations run for a domain, in order, with their settings: built once."""

    plugins: tuple[str, ...]
    settings: dict[str, Any]
    hooks: dict[str, tuple[Impl, ...]]
    problems: list[tuple[str, str]]  # (plugin, why it cannot be used)
    hold_back: int
    max_retries: int
    timeout: float
    tools: list[Tool] = field(default_factory=list)


class RequestHooks:
    """The plugin hooks of one request, in the domain's order (see the module docstring)."""

    def __init__(self, invoker: Invoker, plan: DomainPlan, *, request_id: str, domain: str,
                 search_knowledge: KnowledgeSearch | None = None) -> None:
        self.request_id = request_id
        self.domain = domain
        self.search_knowledge = search_knowledge
        self.max_retries = plan.max_retries
        self._invoker = invoker
        self._plan = plan
        self._shared = RequestState()
        self._contexts: dict[str, PluginContext] = {}
        self._streams: dict[int, OutputStream] = {}  # choice index -> its current attempt's stream
        self._attempts: dict[int, int] = {}

    @property
    def plugins(self) -> tuple[str, ...]:
        return self._plan.plugins

    @property
    def tools(self) -> list[Tool]:
        return list(self._plan.tools)

    @property
    def holds_output(self) -> bool:
        return self._shared.hold_output

    @property
    def changes_output(self) -> bool:
        """Whether output hooks may hold the model's text back or change it (else it passes as generated)."""
        return self.holds_output or any(self._plan.hooks[hook] for hook in OUTPUT_HOOKS)

    def context(self, plugin: str) -> PluginContext:
        ctx = self._contexts.get(plugin)
        if ctx is None:
            ctx = PluginContext(self.request_id, self.domain, plugin, self._plan.settings.get(plugin),
                                search_knowledge=self.search_knowledge, _request=self._shared)
            self._contexts[plugin] = ctx
        return ctx

    def _call(self, impl: Impl, args: dict[str, Any]) -> Any:
        args["ctx"] = self.context(impl.plugin)
        return self._invoker.call(impl, args, self._plan.timeout)

    # -- before generation -------------------------------------------------------

    def request_received(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for impl in self._plan.hooks["request_received"]:
            result = self._call(impl, {"messages": messages})
            if result is not None:
                if not isinstance(result, list) or not all(isinstance(m, dict) for m in result):
                    raise _bad_return(impl, result, "a list of message dicts")
                messages = result
        return messages

    def context_retrieved(self, query: str, chunks: list[Any]) -> list[Any]:
        for impl in self._plan.hooks["context_retrieved"]:
            result = self._call(impl, {"query": query, "chunks": chunks})
            if result is not None:
                if not isinstance(result, list):
                    raise _bad_return(impl, result, "a list of chunks")
                chunks = result
        return chunks

    def sampling_params(self, params: dict[str, Any], response_format: dict[str, Any] | None) -> dict[str, Any]:
        for impl in self._plan.hooks["sampling_params"]:
            result = self._call(impl, {"params": dict(params), "response_format": response_format})
            if result is not None:
                if not isinstance(result, dict):
                    raise _bad_return(impl, result, "a dict of sampling parameters")
                params = result
        return params

    def _builtin_only(self, hook: str) -> bool:
        """Only built-ins (bounded work) on this hook: a thread hop would cost more than the call."""
        return all(impl.builtin for impl in self._plan.hooks[hook])

    async def _off_loop(self, hook: str, function: Callable[..., T], *args: Any) -> T:
        """`function(*args)`, which runs `hook`'s implementations: in the hooks lane when a
        third-party plugin implements it (its deadline is the invoker's), inline otherwise."""
        if self._builtin_only(hook):
            return function(*args)
        return await lanes.HOOKS.run(function, *args)

    async def arequest_received(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """request_received off the event loop (a slow plugin then never stalls other requests)."""
        return await self._off_loop("request_received", self.request_received, messages)

    async def acontext_retrieved(self, query: str, chunks: list[Any]) -> list[Any]:
        return await self._off_loop("context_retrieved", self.context_retrieved, query, chunks)

    async def asampling_params(self, params: dict[str, Any],
                               response_format: dict[str, Any] | None) -> dict[str, Any]:
        return await self._off_loop("sampling_params", self.sampling_params, params, response_format)

    async def afeed(self, stream: OutputStream, text: str) -> str:
        """stream.feed(text): an append on the loop, the plugins' scan of a window off it."""
        if not stream.would_scan(text):
            return stream.feed(text)
        return await self._off_loop("output_chunk", stream.feed, text)

    async def afinish(self, stream: OutputStream) -> str:
        return await self._off_loop("output_chunk", stream.finish)

    async def aoutput_complete(self, text: str, index: int = 0) -> Verdict:
        return await self._off_loop("output_complete", self.output_complete, text, index)

    async def aformat(self, text: str, response: dict[str, Any], citations: list[Any],
                      index: int = 0) -> tuple[str, dict[str, Any]]:
        return await self._off_loop("format_output", self.format, text, response, citations, index)

    # -- during and after generation --------------------------------------------

    def output_stream(self, index: int = 0) -> OutputStream:
        """A fresh filter stream for one generation attempt of choice `index` (again for each retry)."""
        self._attempts[index] = self._attempts.get(index, -1) + 1
        self._shared.attempt = self._attempts[index]
        impls = self._plan.hooks["output_chunk"]
        stream = OutputStream(self._scanner(impls) if impls else None,
                              hold_back=self._plan.hold_back, held=self._shared.hold_output)
        self._streams[index] = stream
        return stream

    def _sent(self, index: int) -> str:
        """What the client already has of choice `index` (nothing while output is held)."""
        self._shared.attempt = self._attempts.get(index, 0)
        stream = self._streams.get(index)
        return stream.emitted if stream is not None and not stream.held else ""

    def _scanner(self, impls: tuple[Impl, ...]) -> Any:
        def scan(window: str, start: int, final: bool) -> list[Replace]:
            edits: list[Replace] = []
            for impl in impls:
                result = self._call(impl, {"window": window, "start": start, "final": final})
                if result:
                    for edit in result:
                        if not (isinstance(edit, Replace) and 0 <= edit.start <= edit.end <= len(window)
                                and isinstance(edit.text, str)):
                            raise _bad_return(impl, edit, "Replace(start, end, text) within the window")
                        edits.append(edit)
            return edits

        return scan

    def output_complete(self, text: str, index: int = 0) -> Verdict:
        """Run the validators; the verdict's text is what to send (whole, or after what was sent)."""
        sent = self._sent(index)
        current, fixed_by = text, None
        for impl in self._plan.hooks["output_complete"]:
            try:
                result = self._call(impl, {"text": current})
            except LoragError as err:
                return Verdict("refuse", current, err.message, impl.plugin)
            if result is None:
                continue
            if not isinstance(result, Verdict) or result.action not in ("pass", "fix", "retry", "refuse"):
                problem = _bad_return(impl, result, "a Verdict or None")
                return Verdict("refuse", current, problem.message, impl.plugin)
            if result.action == "fix":
                current, fixed_by = result.text, impl.plugin
            elif result.action in ("retry", "refuse"):
                message = result.message or f"The answer was rejected by plugin '{impl.plugin}'."
                return self._streamable(Verdict(result.action, current, message, impl.plugin), sent)
        if fixed_by is not None:
            return self._streamable(Verdict("fix", current, None, fixed_by), sent)
        return Verdict("pass", current)

    def _streamable(self, verdict: Verdict, sent: str) -> Verdict:
        """A streamed answer can only grow: turn an impossible fix or retry into a refuse."""
        if not sent:
            return verdict
        if verdict.action == "fix" and verdict.text.startswith(sent):
            return verdict
        if verdict.action in ("fix", "retry"):
            log.warning("plugin_needs_hold_output", plugin=verdict.plugin, action=verdict.action,
                        request_id=self.request_id)
            return Verdict("refuse", verdict.text,
                           f"The answer was withdrawn: plugin '{verdict.plugin}' asked to "
                           f"{verdict.action} text that was already sent.", verdict.plugin)
        return verdict

    def rejection(self, verdict: Verdict) -> OutputRejected:
        """The error to answer with when retries are exhausted."""
        return OutputRejected(
            f"The model's answer was still rejected after {self.max_retries} retries "
            f"(plugin '{verdict.plugin}'): {verdict.message}"
        )

    def format(self, text: str, response: dict[str, Any], citations: list[Any],
               index: int = 0) -> tuple[str, dict[str, Any]]:
        sent = self._sent(index)
        for impl in self._plan.hooks["format_output"]:
            result = self._call(impl, {"text": text, "response": response, "citations": citations})
            if result is None:
                continue
            if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], str)
                    and isinstance(result[1], dict)):
                raise _bad_return(impl, result, "(text, response) or None")
            new_text, response = result
            if sent and not new_text.startswith(sent):
                raise PluginError(
                    f"Plugin '{impl.plugin}' rewrote an answer that was already streamed; a formatter "
                    "that rewrites text must call ctx.hold_output().",
                    plugin=impl.plugin, hook="format_output",
                )
            text = new_text
        return text, response


def _bad_return(impl: Impl, value: Any, expected: str) -> PluginError:
    return PluginError(
        f"Plugin '{impl.plugin}' returned {type(value).__name__} from {impl.hook}; expected {expected}.",
        plugin=impl.plugin, hook=impl.hook,
    )
