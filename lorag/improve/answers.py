"""Answers for the loop: from this server's own pipeline (a domain, an adapter, the base model) or
from any OpenAI-compatible endpoint (a larger teacher elsewhere). One interface for both, so best-of-n
sampling, distillation and promotion do not care where an answer comes from."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Protocol

from lorag.errors import LoragError
from lorag.serving.jobs import new_request_id
from lorag.serving.protocol import ChatCompletionRequest

if TYPE_CHECKING:
    from lorag.serving.pipeline import Pipeline
    from lorag.serving.principal import Principal


class Answerer(Protocol):
    """n answers to one conversation from `model` (a lorag domain, adapter or base model; or a remote model)."""

    async def answer(self, model: str, messages: list[dict[str, Any]], *, n: int = 1,
                     temperature: float | None = None, max_tokens: int | None = None,
                     options: dict[str, Any] | None = None) -> list[str]: ...


class PipelineAnswerer:
    """This process's pipeline, as a chat request from `principal` would be answered (guards, retrieval,
    the domain's adapter, plugins), without HTTP."""

    def __init__(self, pipeline: Pipeline, principal: Principal) -> None:
        self.pipeline = pipeline
        self.principal = principal

    async def answer(self, model: str, messages: list[dict[str, Any]], *, n: int = 1,
                     temperature: float | None = None, max_tokens: int | None = None,
                     options: dict[str, Any] | None = None) -> list[str]:
        body = ChatCompletionRequest.model_validate({
            "model": model, "messages": messages, "n": n, "temperature": temperature, "max_tokens": max_tokens,
            "lorag": options})
        job = await self.pipeline.prepare_chat(body, new_request_id("chatcmpl-loop"), self.principal)
        return [choice.text for choice in await self.pipeline.complete(job)]


class EndpointAnswerer:
    """Any OpenAI-compatible server, through the official client (`options` travels as the `lorag` field)."""

    def __init__(self, base_url: str, api_key_env: str | None = None, timeout_s: float = 600.0) -> None:
        import openai

        key = "none"
        if api_key_env:
            key = os.environ.get(api_key_env, "")
            if not key:
                raise LoragError(f"The environment variable {api_key_env} (the endpoint's API key) is not set.",
                                 param="api_key_env")
        self.client = openai.AsyncOpenAI(base_url=base_url, api_key=key, timeout=timeout_s, max_retries=2)

    async def answer(self, model: str, messages: list[dict[str, Any]], *, n: int = 1,
                     temperature: float | None = None, max_tokens: int | None = None,
                     options: dict[str, Any] | None = None) -> list[str]:
        import openai

        extra: dict[str, Any] = {"extra_body": {"lorag": options}} if options else {}
        try:
            reply = await self.client.chat.completions.create(
                model=model, messages=messages, n=n, temperature=temperature, max_tokens=max_tokens,  # type: ignore[arg-type]
                **extra)
        except openai.APIError as err:
            raise LoragError(f"The endpoint {self.client.base_url} refused {model!r}: {err}", param="teacher") from None
        return [choice.message.content or "" for choice in sorted(reply.choices, key=lambda c: c.index)]
