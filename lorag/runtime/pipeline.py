"""The request path, end to end, in one place.

    resolve model -> hooks: request_received (redact / block input)
    -> prompt (chat template, context check) -> hooks: sampling_params
    -> generate with the adapter -> hooks: output stream (hold-back filters)
    -> hooks: output_complete (pass / fix / retry / refuse) -> hooks: format
    -> choices and usage

Streamed and non-streamed requests take exactly the same path (a non-streamed
one just collects the deltas), so both give the same text. `openai_api` turns
what this module yields into OpenAI JSON / SSE; this module knows nothing about
HTTP. Every stage logs one event with its duration.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from lorag.adapters.registry import AdapterRegistry, AdapterVersion, split_ref
from lorag.config import Settings
from lorag.errors import LoragError, NotFoundError
from lorag.logging import get_logger, stage
from lorag.plugins.runtime import ContentBlocked, PluginHost, RequestHooks
from lorag.runtime.engine import Engine
from lorag.runtime.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields

log = get_logger("lorag.request")


class ContextTooLong(LoragError):
    code = "context_length_exceeded"


@dataclass(frozen=True)
class Target:
    """What answers a request: the base model, or one exact adapter version."""

    model: str
    adapter: AdapterVersion | None

    @property
    def adapter_ref(self) -> str | None:
        return self.adapter.ref if self.adapter else None

    @property
    def domain(self) -> str:
        """The name plugins are configured under: the model asked for, without a version."""
        return split_ref(self.model)[0]


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

    @property
    def base_model(self) -> str:
        return self.settings.model.served_name

    # -- stage 1: resolve --------------------------------------------------------

    def resolve(self, model: str) -> Target:
        """'<base model>' -> base; 'name' -> its current version; 'name@version' -> that version."""
        if model == self.base_model:
            return Target(model=model, adapter=None)
        try:
            return Target(model=model, adapter=self.registry.resolve(model))
        except NotFoundError:
            raise NotFoundError(
                f"The model '{model}' does not exist. GET /v1/models lists the served models.",
                param="model",
            ) from None

    # -- stage 2: prompt ---------------------------------------------------------

    def chat_prompt(self, messages: list[dict[str, Any]]) -> list[int]:
        tokenizer = self.engine.tokenizer
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
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

    def _start(self, model: str, request_id: str) -> tuple[Target, RequestHooks]:
        with stage(log, "resolve", model=model) as info:
            target = self.resolve(model)
            hooks = self.plugins.for_request(request_id=request_id, domain=target.domain)
            info["adapter"] = target.adapter_ref
        return target, hooks

    async def _input_hooks(self, hooks: RequestHooks, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Redact or refuse the input; a refusal (ContentBlocked) is a 400 before any generation."""
        with stage(log, "request_hooks", plugins=len(hooks.plugins)):
            try:
                return await hooks.arequest_received(messages)
            except ContentBlocked as blocked:
                log.info("request_blocked", plugin=blocked.plugin)
                raise

    async def prepare_chat(self, request: ChatCompletionRequest, request_id: str) -> Job:
        started = time.perf_counter()
        target, hooks = self._start(request.model, request_id)
        messages = [{"role": m.role, "content": m.text()} for m in request.messages]
        messages = await self._input_hooks(hooks, messages)
        with stage(log, "prompt") as info:
            prompt = self.chat_prompt(messages)
            max_tokens = self.output_budget(len(prompt), request.output_limit)
            info["prompt_tokens"] = len(prompt)
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
        params = await self.sampling_params(request, max_tokens, logprobs, hooks, request.response_format)
        job = Job(request_id, target, [prompt], params, request.n, request.stream, hooks, messages=messages)
        job.timings["prepare_ms"] = _ms_since(started)
        return job

    async def prepare_completion(self, request: CompletionRequest, request_id: str) -> Job:
        started = time.perf_counter()
        target, hooks = self._start(request.model, request_id)
        raw = request.prompts()
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
            for prompt_index, prompt in enumerate(job.prompts):
                async with aclosing(self._filtered(job, prompt_index, prompt, counts, started)) as deltas:
                    async for delta in deltas:
                        yield delta
        finally:
            job.timings["generate_ms"] = _ms_since(started)
            log.info("generate", duration_ms=job.timings["generate_ms"], adapter=job.target.adapter_ref,
                     prompt_tokens=job.prompt_tokens, **counts)

    async def _filtered(self, job: Job, prompt_index: int, prompt: list[int], counts: dict[str, int],
                        started: float) -> AsyncGenerator[Delta, None]:
        """One prompt's choices through the output filters, validators and formatters (with retries)."""
        hooks = job.hooks
        for attempt in range(hooks.max_retries + 1):
            streams: dict[int, Any] = {}
            sent: dict[int, str] = {}
            done: set[int] = set()  # choices that finished or were blocked
            retry = None
            async with aclosing(self._engine_deltas(job, prompt_index, prompt, counts, started)) as raw_deltas:
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
                            final, updates = hooks.format(verdict.text, {"lorag": {}}, [], raw.index)
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


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def _refusal(sent: str, message: str) -> str:
    """The block message, on its own paragraph when part of the answer was already sent."""
    return f"\n\n{message}" if sent else message


def _finish_reason(reason: str | None) -> str:
    return {"abort": "stop"}.get(reason or "stop", reason or "stop")


def _ms_since(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 2)
