"""Stages 3 and 4: the prompt (chat template, fitted to the window), the output budget, sampling
parameters, and the engine's raw deltas.

The pipeline needs only `TextEngine` of an engine: the real one (lorag.engine.Engine) or a
fake one in tests (tests/echo_engine.py), so the request path can be tested without vLLM.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import TYPE_CHECKING, Any, Protocol

from lorag.errors import LoragError
from lorag.serving.jobs import Delta, Job, Target, ms_since
from lorag.serving.prompt import FittedPrompt, build_messages, fit_prompt
from lorag.serving.protocol import SamplingFields

if TYPE_CHECKING:
    from lorag.adapters.leases import Lease
    from lorag.adapters.registry import AdapterVersion
    from lorag.knowledge.retrieval import Hit
    from lorag.plugins.host import RequestHooks
    from lorag.serving.tool_calls import ToolPlan

# Output tokens kept free for the answer when the request does not say how many it wants.
DEFAULT_OUTPUT_RESERVE = 256


class ContextTooLong(LoragError):
    code = "context_length_exceeded"


class GenerationAborted(LoragError):
    """The engine gave up on a request a client still waits for: not a normal end ("stop")."""

    status_code = 503
    error_type = "server_error"
    code = "generation_aborted"


class TextEngine(Protocol):
    """What the request path asks of an engine: its tokenizer, its window, and streamed outputs.

    `generate` yields vLLM `RequestOutput`s (or objects shaped like them: `.outputs`, each
    with index, text, token_ids, logprobs, finish_reason and finished()); closing the
    iterator aborts the request. `hold` leases an adapter version (lorag.adapters.leases):
    the engine keeps it loaded, and its files, until every lease is given back.
    """

    @property
    def tokenizer(self) -> Any: ...

    @property
    def max_model_len(self) -> int: ...

    def generate(self, prompt_token_ids: list[int], params: Any, request_id: str,
                 adapter: AdapterVersion | None) -> AsyncGenerator[Any, None]: ...

    def hold(self, adapter: AdapterVersion | None) -> Lease: ...


def chat_prompt_ids(tokenizer: Any, messages: list[dict[str, Any]],
                    tools: list[dict[str, Any]] | None = None) -> list[int]:
    """Messages (and the tools on offer, for templates that show them) through the chat template, as
    the server asks the engine; the fine-tuning canary builds its prompts with it too."""
    try:
        text = tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=False,
                                             add_generation_prompt=True)
    except Exception as err:  # jinja errors: the template refused these messages
        raise LoragError(f"The model's chat template cannot render these messages: {err}",
                         param="messages") from None
    return list(tokenizer.encode(text, add_special_tokens=False))


class Generator:
    """Everything that needs the engine: prompts in tokens, budgets, and the raw deltas."""

    def __init__(self, engine: TextEngine) -> None:
        self.engine = engine

    def chat_prompt(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> list[int]:
        return chat_prompt_ids(self.engine.tokenizer, messages, tools)

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

    def fit(self, target: Target, hits: list[Hit], examples: list[Any], messages: list[dict[str, Any]],
            requested: int | None, tools: ToolPlan | None) -> FittedPrompt:
        """The prompt with as much context and as many examples as the window leaves room for."""
        limit = self.engine.max_model_len
        reserve = requested if requested is not None else min(DEFAULT_OUTPUT_RESERVE, max(1, limit // 4))
        system = target.domain.settings.system_prompt if target.domain else ""
        tokenizer = self.engine.tokenizer

        def render(chosen_hits: list[Hit], chosen_examples: list[Any]) -> list[int]:
            return self.chat_prompt(build_messages(system, chosen_hits, chosen_examples, messages),
                                    tools.schemas if tools else None)

        def count(text: str) -> int:
            return len(tokenizer.encode(text, add_special_tokens=False))

        cap = target.domain.settings.knowledge.max_context_tokens if target.domain else None
        fitted = fit_prompt(render, count, hits, examples, limit - reserve, cap)
        if fitted is None:  # the conversation alone leaves no room: the client's error, with numbers
            bare = len(render([], []))
            if requested is not None:
                self.output_budget(bare, requested)
            raise ContextTooLong(
                f"This model's maximum context length is {limit} tokens. However, your prompt is {bare} "
                f"tokens, leaving less than the {reserve} kept for the completion. Please shorten the "
                "messages (or set a smaller max_tokens).", param="messages")
        return fitted

    async def deltas(self, job: Job, prompt_index: int, prompt: list[int], counts: dict[str, int],
                     started: float) -> AsyncGenerator[Delta, None]:
        """The engine's output for one prompt as deltas (choice i*n + j), before any output hook."""
        engine_id = f"{job.request_id}-{prompt_index}-{uuid.uuid4().hex[:6]}"
        counts["prompt_tokens"] = counts.get("prompt_tokens", 0) + len(prompt)  # every attempt and step is processed
        # aclosing: a client that goes away aborts the engine request now, not at garbage collection.
        params = job.params_for(prompt_index)
        async with aclosing(self.engine.generate(prompt, params, engine_id, job.target.adapter)) as outputs:
            async for output in outputs:
                for completion in output.outputs:
                    if "ttft_ms" not in job.timings and completion.token_ids:
                        job.timings["ttft_ms"] = ms_since(started)
                    counts["completion_tokens"] += len(completion.token_ids)
                    if completion.finished() and completion.finish_reason == "abort":
                        raise GenerationAborted("The engine aborted the request before it finished; "
                                                "the answer is incomplete. Retry the request.")
                    yield Delta(
                        index=prompt_index * job.n + completion.index,
                        text=completion.text,
                        token_ids=list(completion.token_ids),
                        logprobs=completion.logprobs,
                        finish_reason=(completion.finish_reason or "stop") if completion.finished() else None,
                    )


async def sampling_params(request: SamplingFields, max_tokens: int, logprobs: int | None,
                          hooks: RequestHooks, response_format: dict[str, Any] | None = None) -> Any:
    """vLLM's SamplingParams from the request, after the plugins' sampling_params hook."""
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

