"""The request path, end to end, in one place.

    resolve model -> domain ("auto": routed), adapter, access
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
HTTP. Every stage logs one event with its duration.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

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
    last_user_text,
    message_dict,
    ms_since,
    request_options,
)
from lorag.serving.output_checks import checked_output
from lorag.serving.prompt import build_messages
from lorag.serving.protocol import ChatCompletionRequest, CompletionRequest
from lorag.serving.resolution import Resolver
from lorag.serving.routing import Router
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
        self.resolver = Resolver(settings.model.served_name, registry, self.domains, self.router)
        self.generator = Generator(engine)
        self.context = ContextRetriever(knowledge, self.domains)

    @property
    def base_model(self) -> str:
        return self.settings.model.served_name

    def resolve(self, model: str, principal: Principal | None = None, question: str = "",
                adapter_override: str | None = None) -> Target:
        return self.resolver.resolve(model, principal, question, adapter_override)

    # -- preparing a job -----------------------------------------------------------

    async def prepare_chat(self, request: ChatCompletionRequest, request_id: str,
                           principal: Principal | None = None) -> Job:
        """Resolve, input hooks, retrieve, tools, prompt (fitted), sampling parameters: a Job."""
        started = time.perf_counter()
        timings: dict[str, float] = {}
        options = request_options(request, principal)
        messages = [message_dict(m) for m in request.messages]
        with stage(log, "resolve", "debug", model=request.model) as info:
            target = self.resolve(request.model, principal, last_user_text(messages), options.adapter)
            info.update(domain=target.domain.name if target.domain else None, adapter=target.adapter_ref)
        timings["resolve_ms"] = ms_since(started)
        hooks = self._hooks(target, request_id, principal)
        messages = await self._input_hooks(hooks, messages)
        extras: dict[str, Any] = {}
        question = last_user_text(messages)  # after the input hooks: retrieval sees redacted text
        hits = await self.context.retrieve(target, options, question, hooks, timings, extras, principal)
        tools = tool_plan(target, hooks, request)
        mark = time.perf_counter()
        domain = target.domain
        with stage(log, "prompt", "debug") as info:
            examples = self.domains.select_examples(domain, question, options.examples) if domain else []
            requested = _output_request(target, request.output_limit)
            fitted = self.generator.fit(target, hits, examples, messages, requested, tools)
            max_tokens = self.generator.output_budget(len(fitted.tokens), requested)
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
                  extras=extras, citations=fitted.hits, tools=tools, requested_max_tokens=requested)
        job.timings.update(timings)
        job.timings["prepare_ms"] = ms_since(started)
        return job

    async def prepare_completion(self, request: CompletionRequest, request_id: str,
                                 principal: Principal | None = None) -> Job:
        """Raw text prompts: a domain model brings its adapter and plugins, not retrieval or examples."""
        started = time.perf_counter()
        with stage(log, "resolve", "debug", model=request.model) as info:
            options = request_options(request, principal)
            raw = request.prompts()
            question = next((p for p in raw if isinstance(p, str)), "")
            target = self.resolve(request.model, principal, question, options.adapter)
            info["adapter"] = target.adapter_ref
        hooks = self._hooks(target, request_id, principal)
        for i, prompt in enumerate(raw):
            if isinstance(prompt, str):  # text prompts pass the input hooks as one user turn
                checked = await self._input_hooks(hooks, [{"role": "user", "content": prompt}])
                raw[i] = str(checked[-1]["content"])
        with stage(log, "prompt", "debug") as info:
            prompts = self.generator.text_prompts(raw)
            budgets = [self.generator.output_budget(len(p), request.output_limit) for p in prompts]
            info["prompt_tokens"] = sum(len(p) for p in prompts)
        params = await sampling_params(request, min(budgets), request.logprobs, hooks)
        job = Job(request_id, target, prompts, params, request.n, request.stream, hooks)
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
        """Deltas of every choice (prompt i, sample j -> choice i*n + j), after the output hooks."""
        started = time.perf_counter()
        counts = {"completion_tokens": 0}
        try:
            if job.tools is not None:
                async with aclosing(tool_loop(self.generator, job, counts, started)) as deltas:
                    async for delta in deltas:
                        yield delta
                return
            for prompt_index, prompt in enumerate(job.prompts):
                async with aclosing(checked_output(self.generator, job, prompt_index, prompt, counts,
                                                   started)) as deltas:
                    async for delta in deltas:
                        yield delta
        finally:
            job.completion_tokens = counts["completion_tokens"]
            job.timings["generate_ms"] = ms_since(started)
            # The request's one info line: what answered, and how long each stage took.
            log.info("generate", duration_ms=job.timings["generate_ms"], adapter=job.target.adapter_ref,
                     domain=job.target.domain.name if job.target.domain else None,
                     prompt_tokens=job.prompt_tokens, **counts,
                     **{name: value for name, value in job.timings.items() if name != "generate_ms"})

    async def complete(self, job: Job) -> list[Choice]:
        """Run a job to the end and return its choices in index order."""
        choices: dict[int, Choice] = {}
        async with aclosing(self.generate(job)) as deltas:
            async for delta in deltas:
                choice = choices.setdefault(delta.index, Choice(index=delta.index))
                choice.text += delta.text
                choice.token_ids.extend(delta.token_ids)
                if delta.logprobs:
                    choice.logprobs.extend(delta.logprobs)
                if delta.finish_reason:
                    choice.finish_reason = delta.finish_reason
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
