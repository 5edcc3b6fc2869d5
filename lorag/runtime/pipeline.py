"""The request path, end to end, in one place.

    resolve model -> (hooks: request) -> prompt (chat template, context check)
    -> sampling params (hooks) -> generate with the adapter -> (hooks: output)
    -> choices and usage

`openai_api` turns what this module yields into OpenAI JSON / SSE; this module
knows nothing about HTTP. Every stage logs one event with its duration.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from lorag.adapters.registry import AdapterRegistry, AdapterVersion
from lorag.config import Settings
from lorag.errors import LoragError, NotFoundError
from lorag.logging import get_logger, stage
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
    timings: dict[str, float] = field(default_factory=dict)
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)


class Runtime:
    """Everything a request needs: settings, the engine, the adapter registry."""

    def __init__(self, settings: Settings, engine: Engine, registry: AdapterRegistry) -> None:
        self.settings = settings
        self.engine = engine
        self.registry = registry

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

    def chat_prompt(self, request: ChatCompletionRequest) -> list[int]:
        tokenizer = self.engine.tokenizer
        messages = [{"role": m.role, "content": m.text()} for m in request.messages]
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as err:  # jinja errors: the template refused these messages
            raise LoragError(f"The model's chat template cannot render these messages: {err}",
                             param="messages") from None
        return list(tokenizer.encode(text, add_special_tokens=False))

    def text_prompts(self, request: CompletionRequest) -> list[list[int]]:
        tokenizer = self.engine.tokenizer
        vocab = len(tokenizer)
        prompts: list[list[int]] = []
        for prompt in request.prompts():
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

    def sampling_params(self, request: SamplingFields, max_tokens: int, logprobs: int | None) -> Any:
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
        try:
            return SamplingParams(**kwargs)
        except Exception as err:  # vLLM's own validation (VLLMValidationError, ValueError)
            raise LoragError(f"Invalid sampling parameters: {err}") from None

    # -- the two entry points ----------------------------------------------------

    def prepare_chat(self, request: ChatCompletionRequest, request_id: str) -> Job:
        timings: dict[str, float] = {}
        with stage(log, "resolve", model=request.model) as info:
            started = time.perf_counter()
            target = self.resolve(request.model)
            info["adapter"] = target.adapter_ref
        with stage(log, "prompt") as info:
            prompt = self.chat_prompt(request)
            max_tokens = self.output_budget(len(prompt), request.output_limit)
            info["prompt_tokens"] = len(prompt)
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
        params = self.sampling_params(request, max_tokens, logprobs)
        timings["prepare_ms"] = _ms_since(started)
        return Job(request_id, target, [prompt], params, request.n, request.stream, timings)

    def prepare_completion(self, request: CompletionRequest, request_id: str) -> Job:
        timings: dict[str, float] = {}
        with stage(log, "resolve", model=request.model) as info:
            started = time.perf_counter()
            target = self.resolve(request.model)
            info["adapter"] = target.adapter_ref
        with stage(log, "prompt") as info:
            prompts = self.text_prompts(request)
            budgets = [self.output_budget(len(p), request.output_limit) for p in prompts]
            info["prompt_tokens"] = sum(len(p) for p in prompts)
        params = self.sampling_params(request, min(budgets), request.logprobs)
        timings["prepare_ms"] = _ms_since(started)
        return Job(request_id, target, prompts, params, request.n, request.stream, timings)

    # -- stage 4: generate -------------------------------------------------------

    async def generate(self, job: Job) -> AsyncIterator[Delta]:
        """Deltas of every choice (prompt i, sample j -> choice i*n + j), in engine order."""
        started = time.perf_counter()
        first_token_at: float | None = None
        completion_tokens = 0
        try:
            for prompt_index, prompt in enumerate(job.prompts):
                engine_id = job.request_id if len(job.prompts) == 1 else f"{job.request_id}-{prompt_index}"
                async for output in self.engine.generate(prompt, job.params, engine_id, job.target.adapter):
                    for completion in output.outputs:
                        if first_token_at is None and completion.token_ids:
                            first_token_at = time.perf_counter()
                        completion_tokens += len(completion.token_ids)
                        yield Delta(
                            index=prompt_index * job.n + completion.index,
                            text=completion.text,
                            token_ids=list(completion.token_ids),
                            logprobs=completion.logprobs,  # type: ignore[arg-type]
                            finish_reason=_finish_reason(completion.finish_reason)
                            if completion.finished()
                            else None,
                        )
        finally:
            job.timings["generate_ms"] = _ms_since(started)
            if first_token_at is not None:
                job.timings["ttft_ms"] = round((first_token_at - started) * 1000, 2)
            log.info("generate", duration_ms=job.timings["generate_ms"], adapter=job.target.adapter_ref,
                     prompt_tokens=job.prompt_tokens, completion_tokens=completion_tokens)

    async def complete(self, job: Job) -> list[Choice]:
        """Run a job to the end and return its choices in index order."""
        choices: dict[int, Choice] = {}
        async for delta in self.generate(job):
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


def _finish_reason(reason: str | None) -> str:
    return {"abort": "stop"}.get(reason or "stop", reason or "stop")


def _ms_since(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 2)
