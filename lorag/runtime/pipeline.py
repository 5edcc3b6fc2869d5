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
one just collects the deltas), so both give the same text. `openai_api` turns
what this module yields into OpenAI JSON / SSE; this module knows nothing about
HTTP. Every stage logs one event with its duration.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lorag.adapters.registry import AdapterRegistry, AdapterVersion, split_ref
from lorag.config import Settings
from lorag.errors import LoragError, NotFoundError, PermissionDenied
from lorag.logging import get_logger, stage
from lorag.plugins.runtime import ContentBlocked, PluginHost, RequestHooks
from lorag.plugins.tools import Tool, tool_from_function
from lorag.runtime.domain_settings import DomainTools
from lorag.runtime.domains import Domain, DomainCatalog
from lorag.runtime.engine import Engine
from lorag.runtime.prompt import build_messages, fit_prompt
from lorag.runtime.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    RequestOptions,
    SamplingFields,
)
from lorag.runtime.routing import RouteDecision, Router
from lorag.runtime.tool_calls import (
    ToolCall,
    ToolPlan,
    arguments_of,
    client_tools,
    forced_choice,
    parse_tool_calls,
    result_text,
)

if TYPE_CHECKING:
    from lorag.knowledge.retrieval import Hit
    from lorag.runtime.auth import Principal

log = get_logger("lorag.request")


class ContextTooLong(LoragError):
    code = "context_length_exceeded"


class KnowledgeUnavailable(LoragError):
    status_code = 503
    error_type = "server_error"
    code = "knowledge_unavailable"


SEARCH_KNOWLEDGE = "search_knowledge"
# A tool-loop step without a requested max_tokens goes ahead only with at least this much room.
MIN_STEP_TOKENS = 16
# Output tokens kept free for the answer when the request does not say how many it wants.
DEFAULT_OUTPUT_RESERVE = 256


@dataclass(frozen=True)
class Target:
    """What answers a request: a domain's profile (or none), and the base model or one adapter version."""

    model: str
    adapter: AdapterVersion | None
    profile: Domain | None = None
    route: RouteDecision | None = None

    @property
    def adapter_ref(self) -> str | None:
        return self.adapter.ref if self.adapter else None

    @property
    def domain(self) -> str:
        """The name plugins are configured under: the domain, else the model asked for without a version."""
        return self.profile.name if self.profile else split_ref(self.model)[0]


@dataclass
class Choice:
    """One choice of a completion, as it grows."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Any]] = field(default_factory=list)
    finish_reason: str | None = None


@dataclass
class Delta:
    """New text (and tokens) for one choice; `finish_reason` set on its last delta."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, Any]] | None
    finish_reason: str | None


@dataclass
class Job:
    """A validated request, ready for the engine."""

    request_id: str
    target: Target
    prompts: list[list[int]]
    params: Any  # vllm.SamplingParams
    n: int
    stream: bool
    hooks: RequestHooks
    messages: list[dict[str, Any]] | None = None  # chat only: what a retry extends
    extras: dict[str, Any] = field(default_factory=dict)  # plugins' additions to the `lorag` field
    citations: list[Hit] = field(default_factory=list)  # the context chunks the prompt holds, numbered from 1
    tools: ToolPlan | None = None  # server- and client-side tools, when the request has any
    tool_calls: dict[int, list[ToolCall]] = field(default_factory=dict)  # choice -> calls for the client
    requested_max_tokens: int | None = None  # what the client (or domain) asked for; None = all that is left
    timings: dict[str, float] = field(default_factory=dict)
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def can_retry(self) -> bool:
        return self.messages is not None and self.n == 1


class Runtime:
    """Everything a request needs: settings, the engine, the adapter registry, the plugins."""

    def __init__(self, settings: Settings, engine: Engine, registry: AdapterRegistry,
                 plugins: PluginHost) -> None:
        self.settings = settings
        self.engine = engine
        self.registry = registry
        self.plugins = plugins
        self.domains = DomainCatalog(settings)
        self.router = Router(settings, self.domains)

    @property
    def base_model(self) -> str:
        return self.settings.model.served_name

    # -- stage 1: resolve --------------------------------------------------------

    def resolve(self, model: str, principal: Principal | None = None, question: str = "",
                adapter_override: str | None = None) -> Target:
        """What answers `model`, checked against the caller's key.

        'auto' -> the routed domain; '<domain>' -> its profile and adapter ('<domain>@v2': that
        version of the domain's adapter); '<base model>' -> base; '<adapter>[@version]' -> it.
        Base and bare adapters are for keys not scoped to domains.
        """
        route = None
        if model == "auto":
            if not self.domains.domains:
                raise NotFoundError("'auto' needs domains in lorag.toml; none are configured.", param="model")
            route = self.router.route(question, principal)
            model = route.domain
        name, version = split_ref(model)
        if name in self.domains:
            self.domains.check_use(principal, name)
            profile = self.domains.get(name)
            adapter = self._domain_adapter(profile, version, adapter_override, principal)
            return Target(model=model, adapter=adapter, profile=profile, route=route)
        if principal is not None and not principal.admin and principal.domains is not None:
            raise PermissionDenied(f"This API key may only use its domains, not the model '{model}'.",
                                   param="model")
        if model == self.base_model:
            return Target(model=model, adapter=None)
        return Target(model=model, adapter=self._adapter(model, "model"))

    def _domain_adapter(self, profile: Domain, version: str | None, override: str | None,
                        principal: Principal | None) -> AdapterVersion | None:
        configured = profile.settings.adapter
        if override is not None:
            if override == "none":
                return None
            if split_ref(override)[0] != (split_ref(configured)[0] if configured else None) and not (
                principal is None or principal.admin or principal.domains is None
            ):
                raise PermissionDenied("This API key may not swap the domain's adapter for another one.",
                                       param="lorag.adapter")
            return self._adapter(override, "lorag.adapter")
        if configured is None:
            if version is not None:
                raise NotFoundError(f"The domain '{profile.name}' has no adapter, so no version '{version}'.",
                                    param="model")
            return None
        ref = f"{split_ref(configured)[0]}@{version}" if version else configured
        return self._adapter(ref, "model")

    def _adapter(self, ref: str, param: str) -> AdapterVersion:
        try:
            return self.registry.resolve(ref)
        except NotFoundError:
            raise NotFoundError(
                f"The model '{ref}' does not exist. GET /v1/models lists the served models.", param=param,
            ) from None

    # -- stage 2: prompt ---------------------------------------------------------

    def chat_prompt(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> list[int]:
        """Messages (and the tools on offer, for templates that show them) through the chat template."""
        tokenizer = self.engine.tokenizer
        try:
            text = tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=False,
                                                 add_generation_prompt=True)
        except Exception as err:  # jinja errors: the template refused these messages
            raise LoragError(f"The model's chat template cannot render these messages: {err}",
                             param="messages") from None
        return list(tokenizer.encode(text, add_special_tokens=False))

    def text_prompts(self, raw_prompts: list[str | list[int]]) -> list[list[int]]:
        tokenizer = self.engine.tokenizer
        vocab = len(tokenizer)
        prompts: list[list[int]] = []
        for prompt in raw_prompts:
            if isinstance(prompt, str):
                prompts.append(list(tokenizer.encode(prompt)))
            else:
                if any(not isinstance(t, int) or t < 0 or t >= vocab for t in prompt):
                    raise LoragError(f"prompt token ids must be in [0, {vocab}).", param="prompt")
                prompts.append(list(prompt))
        if any(not p for p in prompts):
            raise LoragError("prompt must not be empty.", param="prompt")
        return prompts

    def output_budget(self, prompt_len: int, requested: int | None) -> int:
        """max_tokens to ask for; a 400 with the numbers when the context cannot hold it."""
        limit = self.engine.max_model_len
        if requested is None:
            if prompt_len >= limit:
                raise ContextTooLong(
                    f"This model's maximum context length is {limit} tokens. However, your "
                    f"prompt is {prompt_len} tokens, leaving no room for the completion.",
                    param="messages",
                )
            return limit - prompt_len
        if prompt_len + requested > limit:
            raise ContextTooLong(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} for the "
                "completion). Please reduce the prompt or max_tokens.",
                param="max_tokens",
            )
        return requested

    # -- stage 3: sampling parameters -------------------------------------------

    async def sampling_params(self, request: SamplingFields, max_tokens: int, logprobs: int | None,
                              hooks: RequestHooks, response_format: dict[str, Any] | None = None) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        kwargs: dict[str, Any] = {
            "n": request.n,
            "max_tokens": max_tokens,
            "stop": request.stop,
            "seed": request.seed,
            "logprobs": logprobs,
            "ignore_eos": request.ignore_eos,
            "output_kind": RequestOutputKind.DELTA if request.stream else RequestOutputKind.FINAL_ONLY,
        }
        optional = {
            "temperature": request.temperature,
            "top_p": request.top_p,
            "top_k": request.top_k,
            "presence_penalty": request.presence_penalty,
            "frequency_penalty": request.frequency_penalty,
            "repetition_penalty": request.repetition_penalty,
            "min_tokens": request.min_tokens,
        }
        kwargs.update({k: v for k, v in optional.items() if v is not None})
        kwargs = await hooks.asampling_params(kwargs, response_format)
        try:
            return SamplingParams(**kwargs)
        except Exception as err:  # vLLM's own validation (VLLMValidationError, ValueError)
            raise LoragError(f"Invalid sampling parameters: {err}") from None

    # -- the two entry points ----------------------------------------------------

    def _hooks(self, target: Target, request_id: str) -> RequestHooks:
        return self.plugins.for_request(request_id=request_id, domain=target.domain)

    async def _input_hooks(self, hooks: RequestHooks, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Redact or refuse the input; a refusal (ContentBlocked) is a 400 before any generation."""
        with stage(log, "request_hooks", plugins=len(hooks.plugins)):
            try:
                return await hooks.arequest_received(messages)
            except ContentBlocked as blocked:
                log.info("request_blocked", plugin=blocked.plugin)
                raise

    async def prepare_chat(self, request: ChatCompletionRequest, request_id: str,
                           principal: Principal | None = None) -> Job:
        started = time.perf_counter()
        timings: dict[str, float] = {}
        options = request_options(request, principal)
        messages = [message_dict(m) for m in request.messages]
        with stage(log, "resolve", model=request.model) as info:
            target = self.resolve(request.model, principal, last_user_text(messages), options.adapter)
            info.update(domain=target.profile.name if target.profile else None, adapter=target.adapter_ref)
        timings["resolve_ms"] = _ms_since(started)
        hooks = self._hooks(target, request_id)
        messages = await self._input_hooks(hooks, messages)
        extras: dict[str, Any] = {}
        hits = await self._retrieve(target, options, last_user_text(messages), hooks, timings, extras, principal)
        tools = self._tool_plan(target, hooks, request, principal)
        mark = time.perf_counter()
        with stage(log, "prompt") as info:
            profile = target.profile
            examples = (self.domains.select_examples(profile, last_user_text(messages), options.examples)
                        if profile else [])
            requested = self._output_request(target, request.output_limit)
            fitted = self._fit(target, hits, examples, messages, requested, tools)
            max_tokens = self.output_budget(len(fitted.tokens), requested)
            info.update(prompt_tokens=len(fitted.tokens), context_chunks=len(fitted.hits),
                        examples=len(fitted.examples), dropped_chunks=fitted.dropped_hits)
        timings["prompt_ms"] = _ms_since(mark)
        if fitted.dropped_hits or fitted.dropped_examples:
            extras["trimmed"] = {"context_chunks": fitted.dropped_hits, "examples": fitted.dropped_examples}
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
        params = await self.sampling_params(self._with_defaults(target, request), max_tokens, logprobs, hooks,
                                            request.response_format)
        job = Job(request_id, target, [fitted.tokens], params, request.n, request.stream, hooks,
                  messages=build_messages(profile.settings.system_prompt if profile else "", fitted.hits,
                                          fitted.examples, messages),
                  extras=extras, citations=fitted.hits, tools=tools, requested_max_tokens=requested)
        job.timings.update(timings)
        job.timings["prepare_ms"] = _ms_since(started)
        return job

    # -- stage 2: retrieve ---------------------------------------------------------

    async def _retrieve(self, target: Target, options: RequestOptions, question: str, hooks: RequestHooks,
                        timings: dict[str, float], extras: dict[str, Any], principal: Principal | None) -> list[Hit]:
        """The domain's (or the request's) knowledge bases, searched with the last user message."""
        profile = target.profile
        if profile is None or options.no_retrieval or not question.strip():
            if options.knowledge_bases and profile is None:
                raise LoragError("lorag.knowledge_bases needs a domain model (retrieval belongs to domains).",
                                 param="lorag.knowledge_bases")
            return []
        cfg = profile.settings.knowledge
        kbs = options.knowledge_bases if options.knowledge_bases is not None else cfg.bases
        if not kbs:
            return []
        self.domains.check_kbs(principal, kbs)
        mark = time.perf_counter()
        try:
            hits = await asyncio.wait_for(asyncio.to_thread(
                self._query_knowledge, kbs, question, options.top_k or cfg.top_k, options.mode or cfg.mode,
                options.filters if options.filters is not None else cfg.filters, cfg.score_threshold,
            ), timeout=cfg.timeout_s)
        except Exception as err:
            if isinstance(err, LoragError) and err.status_code < 500 and not isinstance(err, NotFoundError):
                raise  # the request's own fault (a bad filter): the client should hear it
            message = "timed out" if isinstance(err, TimeoutError) else str(err) or type(err).__name__
            log.warning("retrieve_failed", domain=profile.name, kbs=kbs, error=message)
            if cfg.on_error == "fail":
                raise KnowledgeUnavailable(
                    f"Retrieval for the domain '{profile.name}' failed: {message}. Try again later.") from None
            extras["retrieval"] = {"skipped": True, "error": message}
            return []
        finally:
            timings["retrieve_ms"] = _ms_since(mark)
        with stage(log, "context_hooks", chunks=len(hits)):
            return list(await hooks.acontext_retrieved(question, hits))

    def _query_knowledge(self, kbs: list[str], question: str, top_k: int | None, mode: str | None,
                         filters: dict[str, Any] | None, threshold: float | None) -> list[Hit]:
        from lorag.knowledge.service import shared_service

        return shared_service(self.settings).query(kbs, question, top_k=top_k, mode=mode, filters=filters,
                                                   score_threshold=threshold)

    # -- stage 3: the prompt, fitted ---------------------------------------------

    def _output_request(self, target: Target, requested: int | None) -> int | None:
        """max_tokens asked for (or the domain's default), within the domain's ceiling."""
        generation = target.profile.settings.generation if target.profile else None
        if generation is None:
            return requested
        if requested is not None and generation.max_tokens_limit and requested > generation.max_tokens_limit:
            raise LoragError(f"max_tokens is {requested}, above the domain's limit of "
                             f"{generation.max_tokens_limit}.", param="max_tokens")
        return requested if requested is not None else generation.max_tokens or generation.max_tokens_limit

    def _fit(self, target: Target, hits: list[Hit], examples: list[Any], messages: list[dict[str, Any]],
             requested: int | None, tools: ToolPlan | None) -> Any:
        limit = self.engine.max_model_len
        reserve = requested if requested is not None else min(DEFAULT_OUTPUT_RESERVE, max(1, limit // 4))
        system = target.profile.settings.system_prompt if target.profile else ""
        tokenizer = self.engine.tokenizer

        def render(chosen_hits: list[Hit], chosen_examples: list[Any]) -> list[int]:
            return self.chat_prompt(build_messages(system, chosen_hits, chosen_examples, messages),
                                    tools.schemas if tools else None)

        def count(text: str) -> int:
            return len(tokenizer.encode(text, add_special_tokens=False))

        cap = target.profile.settings.knowledge.max_context_tokens if target.profile else None
        fitted = fit_prompt(render, count, hits, examples, limit - reserve, cap)
        if fitted is None:  # the conversation alone leaves no room: the client's error, with numbers
            self.output_budget(len(render([], [])), requested if requested is not None else limit)
            raise AssertionError("output_budget raises when the bare prompt does not fit")
        return fitted

    # -- tools ---------------------------------------------------------------------

    def _tool_plan(self, target: Target, hooks: RequestHooks, request: ChatCompletionRequest,
                   principal: Principal | None) -> ToolPlan | None:
        """Server-side tools the domain enables, plus the client's own; None when there are neither."""
        client = client_tools(request.tools, request.tool_choice)
        profile = target.profile
        server: dict[str, Tool] = {}
        if profile is not None and request.tool_choice != "none":
            offered = {tool.name: tool for tool in hooks.tools}
            for name in profile.settings.tools.enabled:
                if name == SEARCH_KNOWLEDGE:
                    server[name] = self._search_tool(profile, principal)
                elif name in offered:
                    server[name] = offered[name]
                else:
                    log.warning("tool_unavailable", domain=profile.name, tool=name)
        if not server and not client:
            return None
        clash = sorted(server.keys() & {str(t["function"]["name"]) for t in client})
        if clash:
            raise LoragError(f"the tool '{clash[0]}' is one of the domain's own tools; rename yours", param="tools")
        if request.n != 1:
            raise LoragError("n must be 1 when tools are in play", param="n")
        cfg = profile.settings.tools if profile else DomainTools()
        forced = forced_choice(request.tool_choice, set(server) | {str(t["function"]["name"]) for t in client})
        return ToolPlan(server=server, client=client, parser=cfg.parser, max_steps=cfg.max_steps,
                        timeout_s=cfg.timeout_s, forced=forced)

    def _search_tool(self, profile: Domain, principal: Principal | None) -> Tool:
        """The built-in `search_knowledge`: the model searches its domain's knowledge bases itself."""
        kbs = profile.knowledge_bases
        self.domains.check_kbs(principal, kbs)
        top_k_default = profile.settings.knowledge.top_k or 3

        def search_knowledge(query: str, top_k: int = top_k_default) -> list[dict[str, Any]]:
            """Search this domain's knowledge bases; returns the best passages with their sources."""
            if not kbs:
                return []
            hits = self._query_knowledge(kbs, query, min(max(top_k, 1), 20), profile.settings.knowledge.mode,
                                         profile.settings.knowledge.filters, profile.settings.knowledge.score_threshold)
            return [{"source": h.source, "location": h.location, "text": h.text, "score": h.score, "kb": h.kb}
                    for h in hits]

        return tool_from_function(search_knowledge, plugin="lorag")

    def _with_defaults(self, target: Target, request: ChatCompletionRequest) -> ChatCompletionRequest:
        """The request with the domain's generation defaults where it left a field out."""
        generation = target.profile.settings.generation if target.profile else None
        if generation is None:
            return request
        defaults = {"temperature": generation.temperature, "top_p": generation.top_p, "stop": generation.stop}
        missing = {k: v for k, v in defaults.items() if v is not None and getattr(request, k) is None}
        return request.model_copy(update=missing) if missing else request

    async def prepare_completion(self, request: CompletionRequest, request_id: str,
                                 principal: Principal | None = None) -> Job:
        """Raw text prompts: a domain model brings its adapter and plugins, not retrieval or examples."""
        started = time.perf_counter()
        with stage(log, "resolve", model=request.model) as info:
            options = request_options(request, principal)
            raw = request.prompts()
            question = next((p for p in raw if isinstance(p, str)), "")
            target = self.resolve(request.model, principal, question, options.adapter)
            info["adapter"] = target.adapter_ref
        hooks = self._hooks(target, request_id)
        for i, prompt in enumerate(raw):
            if isinstance(prompt, str):  # text prompts pass the input hooks as one user turn
                checked = await self._input_hooks(hooks, [{"role": "user", "content": prompt}])
                raw[i] = str(checked[-1]["content"])
        with stage(log, "prompt") as info:
            prompts = self.text_prompts(raw)
            budgets = [self.output_budget(len(p), request.output_limit) for p in prompts]
            info["prompt_tokens"] = sum(len(p) for p in prompts)
        params = await self.sampling_params(request, min(budgets), request.logprobs, hooks)
        job = Job(request_id, target, prompts, params, request.n, request.stream, hooks)
        job.timings["prepare_ms"] = _ms_since(started)
        return job

    # -- stage 4: generate, through the output hooks ---------------------------

    async def generate(self, job: Job) -> AsyncGenerator[Delta, None]:
        """Filtered deltas of every choice (prompt i, sample j -> choice i*n + j)."""
        started = time.perf_counter()
        counts = {"completion_tokens": 0}
        try:
            if job.tools is not None:
                async with aclosing(self._agent(job, counts, started)) as deltas:
                    async for delta in deltas:
                        yield delta
                return
            for prompt_index, prompt in enumerate(job.prompts):
                async with aclosing(self._filtered(job, prompt_index, prompt, counts, started)) as deltas:
                    async for delta in deltas:
                        yield delta
        finally:
            job.timings["generate_ms"] = _ms_since(started)
            log.info("generate", duration_ms=job.timings["generate_ms"], adapter=job.target.adapter_ref,
                     prompt_tokens=job.prompt_tokens, **counts)

    async def _agent(self, job: Job, counts: dict[str, int], started: float) -> AsyncGenerator[Delta, None]:
        """The tool loop: generate, run the server-side calls, feed their results back, up to max_steps.

        Steps with tool calls are not shown to the client (their calls and results are, in
        `lorag.tools`); the final answer goes through the output hooks like any other, and
        calls to the client's own tools end the request with finish_reason "tool_calls".
        """
        plan = job.tools
        assert plan is not None and job.messages is not None
        prompt = job.prompts[0]
        free_params = job.params
        for step in range(plan.max_steps + 1):
            forced = step == 0 and plan.forced is not None
            job.params = _forcing(free_params, plan) if forced else free_params
            raw = [delta async for delta in self._engine_deltas(job, 0, prompt, counts, started)]
            job.params = free_params
            text = "".join(delta.text for delta in raw)
            if forced:
                content, calls = "", plan.forced_calls(text)
            else:
                content, calls = parse_tool_calls(plan.parser, self.engine.tokenizer, text, plan.schemas)
            if calls and step == plan.max_steps:
                log.info("tool_loop_stopped", reason="max_steps", steps=step)
                job.extras["tools"] = {"calls": plan.trace, "stopped": "max_steps"}
            if not calls or step == plan.max_steps:
                job.extras.setdefault("tools", {"calls": plan.trace})
                async with aclosing(self._filtered(job, 0, prompt, counts, started, _replay(raw))) as final:
                    async for delta in final:
                        yield delta
                return
            for_client = [call for call in calls if call.name not in plan.server]
            results = [await self._run_tool(plan, call, step) for call in calls if call.name in plan.server]
            if for_client:
                job.tool_calls[0] = for_client
                job.extras["tools"] = {"calls": plan.trace}
                yield Delta(0, content, [], None, "tool_calls")
                return
            job.messages = [*job.messages,
                            {"role": "assistant", "content": content, "tool_calls": [c.to_openai() for c in calls]},
                            *({"role": "tool", "tool_call_id": call.id, "name": call.name, "content": result}
                              for call, result in zip(calls, results, strict=True))]
            following = self.chat_prompt(job.messages, plan.schemas)
            if not self._fits_next_step(job, len(following)):
                log.info("tool_loop_stopped", reason="context_length", steps=step + 1)
                job.extras["tools"] = {"calls": plan.trace, "stopped": "context_length"}
                async with aclosing(self._filtered(job, 0, prompt, counts, started, _replay(raw))) as final:
                    async for delta in final:
                        yield delta
                return
            prompt = job.prompts[0] = following
            free_params = job.params  # _fits_next_step may have given the next step a new max_tokens

    def _fits_next_step(self, job: Job, prompt_len: int) -> bool:
        """Room for the next step's answer; without a requested max_tokens it takes what is left."""
        room = self.engine.max_model_len - prompt_len
        if job.requested_max_tokens is not None:
            return room >= job.requested_max_tokens
        if room < MIN_STEP_TOKENS:
            return False
        job.params = job.params.clone()
        job.params.max_tokens = room
        return True

    async def _run_tool(self, plan: ToolPlan, call: ToolCall, step: int) -> str:
        """One server-side call, bounded by the domain's timeout; a failure is a result the model reads."""
        mark = time.perf_counter()
        entry: dict[str, Any] = {"step": step + 1, "id": call.id, "name": call.name, "arguments": call.arguments}
        try:
            arguments = arguments_of(call)
            result = await asyncio.wait_for(asyncio.to_thread(plan.server[call.name].call, arguments),
                                            timeout=plan.timeout_s)
            entry["result"] = text = result_text(result)
        except Exception as err:
            message = f"timed out after {plan.timeout_s} s" if isinstance(err, TimeoutError) else str(err)
            entry["error"] = message
            text = result_text({"error": message})
        entry["duration_ms"] = _ms_since(mark)
        plan.trace.append(entry)
        log.info("tool_call", tool=call.name, step=step + 1, ok="error" not in entry, duration_ms=entry["duration_ms"])
        return text

    async def _filtered(self, job: Job, prompt_index: int, prompt: list[int], counts: dict[str, int],
                        started: float, first: AsyncGenerator[Delta, None] | None = None,
                        ) -> AsyncGenerator[Delta, None]:
        """One prompt's choices through the output filters, validators and formatters (with retries).

        `first`: deltas already generated (the tool loop's last step) to use instead of the engine's
        on the first attempt.
        """
        hooks = job.hooks
        for attempt in range(hooks.max_retries + 1):
            streams: dict[int, Any] = {}
            sent: dict[int, str] = {}
            done: set[int] = set()  # choices that finished or were blocked
            retry = None
            source = first if attempt == 0 and first is not None else self._engine_deltas(
                job, prompt_index, prompt, counts, started)
            async with aclosing(source) as raw_deltas:
                async for raw in raw_deltas:
                    if raw.index not in streams:
                        streams[raw.index], sent[raw.index] = hooks.output_stream(raw.index), ""
                    stream = streams[raw.index]
                    if raw.index in done:
                        continue  # blocked earlier; the engine still produces its siblings
                    text = stream.feed(raw.text)
                    finish = raw.finish_reason
                    if stream.blocked is None and finish is not None:
                        text += stream.finish()
                    if stream.blocked is not None:
                        text, finish = text + _refusal(sent[raw.index] + text, stream.blocked), "content_filter"
                    elif finish is not None:
                        verdict = hooks.output_complete(stream.text, raw.index)
                        if verdict.action == "retry":
                            if not (job.can_retry and attempt < hooks.max_retries):
                                raise hooks.rejection(verdict)
                            retry = (stream.text, verdict.message or "")
                            break
                        if verdict.action == "refuse":
                            text, finish = text + _refusal(sent[raw.index] + text, verdict.message or ""), "content_filter"
                        else:
                            final, updates = hooks.format(verdict.text, {"lorag": {}}, job.citations, raw.index)
                            job.extras.update(updates.get("lorag") or {})
                            text = final[len(sent[raw.index]):]
                    sent[raw.index] += text
                    if finish is not None:
                        done.add(raw.index)
                    yield Delta(raw.index, text, raw.token_ids, raw.logprobs, finish)
                    if len(done) == job.n:
                        break  # every choice is over: closing the stream aborts what the engine still runs
            if retry is None:
                job.extras["attempts"] = attempt + 1
                return
            prompt = await self._retry_prompt(job, *retry)
        raise AssertionError("unreachable: the last attempt either returns or raises")

    async def _retry_prompt(self, job: Job, answer: str, message: str) -> list[int]:
        """The conversation plus the rejected answer and the validator's message, as the next prompt."""
        assert job.messages is not None
        job.messages = [*job.messages, {"role": "assistant", "content": answer}, {"role": "user", "content": message}]
        prompt = self.chat_prompt(job.messages)
        self.output_budget(len(prompt), job.params.max_tokens)
        log.info("retry", reason=message[:200])
        return prompt

    async def _engine_deltas(self, job: Job, prompt_index: int, prompt: list[int], counts: dict[str, int],
                             started: float) -> AsyncGenerator[Delta, None]:
        engine_id = f"{job.request_id}-{prompt_index}-{uuid.uuid4().hex[:6]}"
        async for output in self.engine.generate(prompt, job.params, engine_id, job.target.adapter):
            for completion in output.outputs:
                if "ttft_ms" not in job.timings and completion.token_ids:
                    job.timings["ttft_ms"] = _ms_since(started)
                counts["completion_tokens"] += len(completion.token_ids)
                yield Delta(
                    index=prompt_index * job.n + completion.index,
                    text=completion.text,
                    token_ids=list(completion.token_ids),
                    logprobs=completion.logprobs,  # type: ignore[arg-type]
                    finish_reason=_finish_reason(completion.finish_reason) if completion.finished() else None,
                )

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


def _forcing(params: Any, plan: ToolPlan) -> Any:
    """The step's sampling parameters with its output held to the forced tool call(s)."""
    from lorag.plugins.builtin.json_schema import constraint

    forced = params.clone()
    forced.structured_outputs = constraint(plan.forced_schema(), compact=True)
    return forced


async def _replay(deltas: list[Delta]) -> AsyncGenerator[Delta, None]:
    for delta in deltas:
        yield delta


def message_dict(message: Any) -> dict[str, Any]:
    """A chat message as the chat template takes it, tool-call fields included."""
    entry: dict[str, Any] = {"role": message.role, "content": message.text()}
    for key in ("name", "tool_calls", "tool_call_id"):
        value = getattr(message, key)
        if value is not None:
            entry[key] = value
    return entry


def request_options(request: SamplingFields, principal: Principal | None) -> RequestOptions:
    """The body's `lorag` field, validated; only keys allowed overrides may send one."""
    if not request.lorag:
        return RequestOptions()
    if principal is not None and not principal.admin and not principal.overrides:
        raise PermissionDenied("This API key may not send per-request `lorag` options.", param="lorag")
    return RequestOptions.parse(request.lorag)


def last_user_text(messages: list[dict[str, Any]]) -> str:
    """What retrieval, routing and example selection look at: the latest user turn."""
    for message in reversed(messages):
        if message["role"] == "user":
            return str(message.get("content") or "")
    return ""


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def _refusal(sent: str, message: str) -> str:
    """The block message, on its own paragraph when part of the answer was already sent."""
    return f"\n\n{message}" if sent else message


def _finish_reason(reason: str | None) -> str:
    return {"abort": "stop"}.get(reason or "stop", reason or "stop")


def _ms_since(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 2)
