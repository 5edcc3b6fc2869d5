"""The request path, end to end, in one place.

    resolve model -> domain ("auto": routed on what plugins.before_routing lets through), adapter
            version (leased until the last token), access
    -> hooks: request_received (redact / block input)
    -> retrieve from the domain's knowledge bases -> hooks: context_retrieved
    -> prompt (system + examples + numbered context + conversation, fitted to the window)
    -> hooks: sampling_params -> generate with the adapter
    -> hooks: output stream (hold-back filters)
    -> hooks: output_complete (pass / fix / retry / refuse) -> hooks: format
    -> choices, usage, and the `lorag` extras (domain, adapter, citations, timings)

Streamed and non-streamed requests take exactly the same path (a non-streamed
one just collects the deltas), so both give the same text. `lorag.server.openai_api` turns
what this module yields into OpenAI JSON / SSE; this module knows nothing about
HTTP. Every stage logs one event with its duration. Work that can take more than a few hundred
microseconds (third-party hooks, routing, retrieval, tools, prompt rendering) runs in a lane of
threads (lorag.lanes), never on the event loop that carries every stream.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Iterator
from contextlib import aclosing, contextmanager
from typing import TYPE_CHECKING, Any

from lorag import lanes
from lorag.adapters.leases import Lease
from lorag.adapters.registry import AdapterRegistry
from lorag.config import Settings
from lorag.errors import LoragError
from lorag.logging import get_logger, stage
from lorag.plugins.host import ContentBlocked, PluginHost, RequestHooks
from lorag.serving.context import ContextRetriever
from lorag.serving.domains import DomainCatalog
from lorag.serving.generation import Generator, TextEngine, sampling_params
from lorag.serving.jobs import (
    Choice,
    Delta,
    Job,
    Target,
    add_delta,
    last_user_text,
    message_dict,
    ms_since,
    request_options,
)
from lorag.serving.merge import merged
from lorag.serving.output_checks import checked_output
from lorag.serving.prompt import FittedPrompt, build_messages
from lorag.serving.protocol import ChatCompletionRequest, CompletionRequest
from lorag.serving.resolution import Resolver
from lorag.serving.routing import RouteDecision, Router
from lorag.serving.tool_loop import tool_loop, tool_plan

if TYPE_CHECKING:
    from lorag.knowledge.link import KnowledgeLink
    from lorag.serving.principal import Principal

log = get_logger("lorag.request")


class Pipeline:
    """Everything a request needs: settings, the engine, the adapter registry, the plugins, the knowledge.

    Built by lorag.serving.build.build_pipeline (the one place the parts are put together).
    """

    def __init__(self, settings: Settings, engine: TextEngine, registry: AdapterRegistry,
                 plugins: PluginHost, knowledge: KnowledgeLink) -> None:
        self.settings = settings
        self.engine = engine
        self.registry = registry
        self.plugins = plugins
        self.knowledge = knowledge
        self.domains = DomainCatalog(settings)
        self.router = Router(settings, self.domains, knowledge)
        self.resolver = Resolver(settings.model.served_name, registry, self.domains)
        self.generator = Generator(engine)
        self.context = ContextRetriever(knowledge, self.domains)

    @property
    def base_model(self) -> str:
        return self.settings.model.served_name

    async def resolve(self, model: str, principal: Principal | None = None, question: str = "",
                      adapter_override: str | None = None, request_id: str = "") -> tuple[Target, Lease]:
        """What answers `model`, and a lease on its adapter version that the caller gives back.

        The registry lookup and the lease happen in one step of the event loop, where an admin's
        remove also runs: a version is either not found or held until the request's last token.
        """
        route = await self._route(question, principal, request_id) if model == "auto" else None
        target = self.resolver.resolve(model, principal, adapter_override, route)
        return target, self.engine.hold(target.adapter)

    async def _route(self, question: str, principal: Principal | None, request_id: str) -> RouteDecision:
        """`auto`: the question as `plugins.before_routing` lets it through, routed off the loop."""
        self.resolver.check_auto()
        hooks = self.plugins.before_routing(request_id)
        if hooks.plugins:
            question = last_user_text(await self._input_hooks(hooks, [{"role": "user", "content": question}]))
        try:
            return await lanes.KNOWLEDGE.run(self.router.route, question, principal,
                                             timeout=self.settings.routing.timeout_s)
        except TimeoutError:
            return self.router.without_route(principal, f"routing took over {self.settings.routing.timeout_s:g} s")

    # -- preparing a job -----------------------------------------------------------

    async def prepare_chat(self, request: ChatCompletionRequest, request_id: str,
                           principal: Principal | None = None) -> Job:
        """Resolve, input hooks, retrieve, tools, prompt (fitted), sampling parameters: a Job."""
        started = time.perf_counter()
        timings: dict[str, float] = {}
        options = request_options(request, principal)
        messages = [message_dict(m) for m in request.messages]
        with stage(log, "resolve", "debug", model=request.model) as info:
            target, lease = await self.resolve(request.model, principal, last_user_text(messages), options.adapter,
                                               request_id)
            info.update(domain=target.domain.name if target.domain else None, adapter=target.adapter_ref)
        timings["resolve_ms"] = ms_since(started)
        with _released_on_error(lease):
            hooks = self._hooks(target, request_id, principal)
            messages = await self._input_hooks(hooks, messages)
            extras: dict[str, Any] = {}
            question = last_user_text(messages)  # after the input hooks: retrieval sees redacted text
            hits = await self.context.retrieve(target, options, question, hooks, timings, extras, principal)
            tools = tool_plan(target, hooks, request)
            mark = time.perf_counter()
            domain = target.domain
            requested = _output_request(target, request.output_limit)
            with stage(log, "prompt", "debug") as info:
                fitted, max_tokens = await lanes.PROMPTS.run(self._fit, target, hits, question, options.examples,
                                                             messages, requested, tools)
                info.update(prompt_tokens=len(fitted.tokens), context_chunks=len(fitted.hits),
                            examples=len(fitted.examples), dropped_chunks=fitted.dropped_hits)
            timings["prompt_ms"] = ms_since(mark)
            if fitted.dropped_hits or fitted.dropped_examples:
                extras["trimmed"] = {"context_chunks": fitted.dropped_hits, "examples": fitted.dropped_examples}
            logprobs = (request.top_logprobs or 0) if request.logprobs else None
            params = await sampling_params(_with_defaults(target, request), max_tokens, logprobs, hooks,
                                           request.response_format)
            job = Job(request_id, target, [fitted.tokens], params, request.n, request.stream, hooks,
                      messages=build_messages(domain.settings.system_prompt if domain else "", fitted.hits,
                                              fitted.examples, messages),
                      extras=extras, citations=fitted.hits, tools=tools, requested_max_tokens=requested, lease=lease,
                      conversation=messages)
        job.timings.update(timings)
        job.timings["prepare_ms"] = ms_since(started)
        return job

    def _fit(self, target: Target, hits: list[Any], question: str, examples_asked: int | None,
             messages: list[dict[str, Any]], requested: int | None, tools: Any) -> tuple[FittedPrompt, int]:
        """Examples, the fitted prompt and the output budget: template renders and tokenisation (a thread)."""
        domain = target.domain
        examples = self.domains.select_examples(domain, question, examples_asked) if domain else []
        fitted = self.generator.fit(target, hits, examples, messages, requested, tools)
        return fitted, self.generator.output_budget(len(fitted.tokens), requested)

    async def prepare_completion(self, request: CompletionRequest, request_id: str,
                                 principal: Principal | None = None) -> Job:
        """Raw text prompts: a domain model brings its adapter and plugins, not retrieval or examples."""
        started = time.perf_counter()
        with stage(log, "resolve", "debug", model=request.model) as info:
            options = request_options(request, principal)
            raw = request.prompts()
            question = next((p for p in raw if isinstance(p, str)), "")
            target, lease = await self.resolve(request.model, principal, question, options.adapter, request_id)
            info["adapter"] = target.adapter_ref
        with _released_on_error(lease):
            hooks = self._hooks(target, request_id, principal)
            for i, prompt in enumerate(raw):
                if isinstance(prompt, str):  # text prompts pass the input hooks as one user turn
                    checked = await self._input_hooks(hooks, [{"role": "user", "content": prompt}])
                    raw[i] = str(checked[-1]["content"])
            with stage(log, "prompt", "debug") as info:
                prompts = await lanes.PROMPTS.run(self.generator.text_prompts, raw)
                # Each prompt has its own room: a short one is not held to the longest one's budget.
                budgets = [self.generator.output_budget(len(p), request.output_limit) for p in prompts]
                info["prompt_tokens"] = sum(len(p) for p in prompts)
            params = await sampling_params(request, max(budgets), request.logprobs, hooks)
            job = Job(request_id, target, prompts, params, request.n, request.stream, hooks,
                      budgets=budgets if len(set(budgets)) > 1 else None, lease=lease)
        job.timings["prepare_ms"] = ms_since(started)
        return job

    def _hooks(self, target: Target, request_id: str, principal: Principal | None) -> RequestHooks:
        return self.plugins.for_request(request_id=request_id, domain=target.plugin_scope,
                                        search_knowledge=self.context.searcher(target.domain, principal))

    async def _input_hooks(self, hooks: RequestHooks, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Redact or refuse the input; a refusal (ContentBlocked) is a 400 before any generation."""
        with stage(log, "request_hooks", "debug", plugins=len(hooks.plugins)):
            try:
                return await hooks.arequest_received(messages)
            except ContentBlocked as blocked:
                log.info("request_blocked", plugin=blocked.plugin)
                raise

    # -- running a job -------------------------------------------------------------

    async def generate(self, job: Job) -> AsyncGenerator[Delta, None]:
        """Deltas of every choice (prompt i, sample j -> choice i*n + j), after the output hooks.

        A job's prompts run at once. Its adapter lease is given back when this ends, however.
        """
        started = time.perf_counter()
        counts = {"prompt_tokens": 0, "completion_tokens": 0}
        try:
            if job.tools is not None:
                source = tool_loop(self.generator, job, counts, started)
            else:
                source = merged([checked_output(self.generator, job, index, prompt, counts, started)
                                 for index, prompt in enumerate(job.prompts)])
            async with aclosing(source) as deltas:
                async for delta in deltas:
                    yield delta
        finally:
            job.release()
            job.completion_tokens = counts["completion_tokens"]
            job.processed_prompt_tokens = counts["prompt_tokens"]
            job.timings["generate_ms"] = ms_since(started)
            # The request's one info line: what answered, and how long each stage took.
            log.info("generate", duration_ms=job.timings["generate_ms"], adapter=job.target.adapter_ref,
                     domain=job.target.domain.name if job.target.domain else None,
                     **counts, **{name: value for name, value in job.timings.items() if name != "generate_ms"})

    async def complete(self, job: Job) -> list[Choice]:
        """Run a job to the end and return its choices in index order."""
        choices: dict[int, Choice] = {}
        async with aclosing(self.generate(job)) as deltas:
            async for delta in deltas:
                add_delta(choices, delta)
        return [choices[i] for i in sorted(choices)]


def _output_request(target: Target, requested: int | None) -> int | None:
    """max_tokens asked for (or the domain's default), within the domain's ceiling."""
    generation = target.domain.settings.generation if target.domain else None
    if generation is None:
        return requested
    if requested is not None and generation.max_tokens_limit and requested > generation.max_tokens_limit:
        raise LoragError(f"max_tokens is {requested}, above the domain's limit of "
                         f"{generation.max_tokens_limit}.", param="max_tokens")
    return requested if requested is not None else generation.max_tokens or generation.max_tokens_limit


def _with_defaults(target: Target, request: ChatCompletionRequest) -> ChatCompletionRequest:
    """The request with the domain's generation defaults where it left a field out."""
    generation = target.domain.settings.generation if target.domain else None
    if generation is None:
        return request
    defaults = {"temperature": generation.temperature, "top_p": generation.top_p, "stop": generation.stop}
    missing = {k: v for k, v in defaults.items() if v is not None and getattr(request, k) is None}
    return request.model_copy(update=missing) if missing else request


@contextmanager
def _released_on_error(lease: Lease) -> Iterator[None]:
    """A job that is never made (a refusal, a bad request) gives its adapter lease back at once."""
    try:
        yield
    except BaseException:
        lease.release()
        raise
