"""OpenAI-compatible routes: /v1/models, /v1/chat/completions, /v1/completions.

Shapes follow OpenAI's API reference so unmodified OpenAI clients work; lorag's
extras (adapter, timings) travel in a `lorag` field that those clients ignore.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from lorag.errors import LoragError, NotFoundError, PermissionDenied
from lorag.server.auth import Principal, require_key
from lorag.server.errors import error_body
from lorag.server.limits import admit, release_slot
from lorag.server.metrics import forget_adapter, observe
from lorag.server.recorder import CompletionRecorder, Keep
from lorag.server.stream_events import (
    ChoiceEvents,
    chat_choice,
    event,
    json_event,
    opening_choice,
    text_choice,
)
from lorag.serving.jobs import Choice, Delta, Job, add_delta, new_request_id
from lorag.serving.pipeline import Pipeline
from lorag.serving.prompt import citation
from lorag.serving.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionRequest,
    ChatDelta,
    CompletionRequest,
    ModelCard,
    ModelList,
    StreamChunk,
    TextChoice,
    TextCompletion,
    Usage,
)
from lorag.serving.resolution import may_name
from lorag.serving.token_release import token_text

router = APIRouter()
DISCONNECT_POLL_S = 0.5
ChunkKind = Literal["chat.completion.chunk", "text_completion"]
CHAT_CHUNK: ChunkKind = "chat.completion.chunk"
TEXT_CHUNK: ChunkKind = "text_completion"


async def get_pipeline(request: Request) -> Pipeline:
    pipeline: Pipeline = request.app.state.pipeline
    return pipeline


@router.get("/v1/models")
async def list_models(
    pipeline: Pipeline = Depends(get_pipeline), principal: Principal = Depends(require_key)
) -> dict[str, Any]:
    """Domains the key may use (and 'auto'), then the base model and adapters for unscoped keys."""
    created = int(time.time())
    base = pipeline.base_model

    def card(model_id: str, root: str, parent: str | None, when: int = created, **extra: Any) -> ModelCard:
        return ModelCard(id=model_id, object="model", created=when, owned_by="lorag", root=root, parent=parent,
                         **extra)

    usable = pipeline.domains.usable(principal)
    data = [card(d.name, d.settings.adapter or base, base, lorag={"domain": d.name, **d.summary()}) for d in usable]
    if usable:
        data.append(card("auto", base, base, lorag={"routes_to": [d.name for d in usable]}))
    if principal.admin or principal.domains is None:
        data.append(card(base, base, None, max_model_len=pipeline.engine.max_model_len))
        for entry in pipeline.registry.current():
            if not may_name(principal, entry):
                continue
            data.extend(card(model_id, entry.ref, base, int(entry.created_at),
                             lorag={"adapter": entry.ref, "rank": entry.rank, "lora_int_id": entry.lora_int_id})
                        for model_id in ((entry.name,) if entry.owner else (entry.name, entry.ref))
                        if model_id not in pipeline.domains)  # a domain of that name answers it
    return ModelList(object="list", data=data).model_dump(exclude_unset=True)


@router.delete("/v1/models/{model:path}")
async def delete_model(model: str, request: Request, pipeline: Pipeline = Depends(get_pipeline),
                       principal: Principal = Depends(require_key)) -> dict[str, Any]:
    """A fine-tuned model goes (its owner's key or an admin): unloaded once no request holds it.
    Other adapters are an operator's to remove (`lorag adapters remove`), not a client's."""
    try:
        entry = pipeline.registry.resolve(model)
    except LoragError:
        entry = None
    if entry is None or not may_name(principal, entry) or "@" in model:
        raise NotFoundError(f"The model '{model}' does not exist.", param="model")
    if entry.owner is None:
        raise PermissionDenied(f"'{model}' is not a fine-tuned model; an operator removes adapters with "
                               "`lorag adapters remove`.", param="model")
    service = request.app.state.adapters
    await service.remove(entry.name, on_released=forget_adapter(request))
    return {"id": model, "object": "model", "deleted": True}


@router.post("/v1/chat/completions")
async def chat_completions(
    body: ChatCompletionRequest,
    request: Request,
    pipeline: Pipeline = Depends(get_pipeline),
    principal: Principal = Depends(require_key),
) -> Any:
    job = await pipeline.prepare_chat(body, request_id_for(request, "chatcmpl"), principal)
    try:
        keep = recorder_of(request).plan(job, body, principal)
    except LoragError:
        job.release()
        raise
    return await respond(request, pipeline, job, body, stream_chat, chat_response, keep)


@router.post("/v1/completions")
async def completions(
    body: CompletionRequest,
    request: Request,
    pipeline: Pipeline = Depends(get_pipeline),
    principal: Principal = Depends(require_key),
) -> Any:
    job = await pipeline.prepare_completion(body, request_id_for(request, "cmpl"), principal)
    return await respond(request, pipeline, job, body, stream_completion, completion_response)


async def respond(request: Request, pipeline: Pipeline, job: Job, body: Any, streamer: Any, builder: Any,
                  keep: Keep | None = None) -> Any:
    """SSE when the client asked for a stream, one JSON response otherwise (the same text either way).

    `keep` (a stored chat completion) gets the response as sent, streamed or not, once it is whole.
    """
    request.state.job = job  # admission gives its adapter lease back at the end (a 429, a stream never started)
    seen = observe(request, job)  # metrics: status, stage timings, tokens
    guard = await admit(request, job)  # the key's token rate (429) and the generation deadline
    if body.stream:
        chunks = seen.stream(guard.stream(streamer(pipeline, job, body, keep)))
        return StreamingResponse(sse(chunks, on_end=lambda: release_slot(request)), media_type="text/event-stream",
                                 headers=_stream_headers(job))
    choices = seen.done(await guard.run(until_disconnected(request, pipeline.complete(job))))
    response = builder(job, body, choices, pipeline).model_dump(exclude_unset=True)
    if keep is not None:
        keep(response)
    return JSONResponse(response, headers={"x-request-id": job.request_id})


# -- helpers --------------------------------------------------------------------


def recorder_of(request: Request) -> CompletionRecorder:
    recorder: CompletionRecorder = request.app.state.recorder
    return recorder


def request_id_for(request: Request, prefix: str) -> str:
    rid: str = request.state.request_id if hasattr(request.state, "request_id") else new_request_id(prefix)
    return rid if rid.startswith(prefix) else f"{prefix}-{rid}"


async def until_disconnected(request: Request, work: Awaitable[list[Choice]]) -> list[Choice]:
    """Await `work`, cancelling it (and so aborting the engine request) if the client goes away."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                raise LoragError("Client disconnected.", code="client_disconnected")
    finally:
        if not task.done():
            task.cancel()


def _stream_headers(job: Job) -> dict[str, str]:
    return {"x-request-id": job.request_id, "cache-control": "no-cache", "x-accel-buffering": "no"}


async def sse(events: AsyncIterator[bytes], on_end: Callable[[], None] | None = None) -> AsyncIterator[bytes]:
    """Server-sent events (written by the streamers); an error mid-stream becomes an error event,
    then [DONE]. `on_end` runs once [DONE] is written (a client that leaves earlier: admission's
    exit cleans up)."""
    try:
        async for data in events:
            yield data
    except LoragError as err:
        yield json_event(error_body(err.message, err.error_type, err.param, err.code))
    except Exception as err:  # never a stack trace to the client
        from lorag.server.errors import log_unexpected

        log_unexpected(err)
        yield json_event(error_body('Internal error while generating.', 'server_error', None, None))
    yield b"data: [DONE]\n\n"
    if on_end is not None:
        on_end()


def usage(job: Job) -> Usage:
    """Every token the engine read and wrote for the request: each retry and tool step included,
    as OpenAI bills every attempt (the logprobs are only those of the text sent)."""
    return Usage.of(job.prompt_tokens, job.completion_tokens)


def stream_chunk(job: Job, body: Any, kind: ChunkKind, choices: list[Any], last: bool = False) -> StreamChunk:
    """One chunk of a chat or text stream. The last one carries lorag's extras and the usage;
    every one has `usage: null` when the client asked for usage."""
    extra: dict[str, Any] = {}
    if body.include_usage:
        extra["usage"] = usage(job) if last else None
    if last:
        extra["lorag"] = lorag_extras(job)
    return StreamChunk(id=job.request_id, object=kind, created=job.created, model=body.model,
                       choices=choices, **extra)


def choice_events(job: Job, body: Any, kind: ChunkKind) -> ChoiceEvents:
    """The writer of a stream's per-token events: the same chunks as `stream_chunk`, without a model each."""
    return ChoiceEvents(job.request_id, kind, job.created, body.model, body.include_usage)


def lorag_extras(job: Job) -> dict[str, Any]:
    """What OpenAI clients ignore and lorag's users read: who answered, from what, how fast."""
    extras = {**job.extras, "domain": job.target.domain.name if job.target.domain else None,
              "adapter": job.target.adapter_ref, "request_id": job.request_id,
              "citations": [citation(number, hit) for number, hit in enumerate(job.citations, start=1)],
              "timings": job.timings}
    if job.target.route is not None:
        extras["route"] = job.target.route.to_dict()
    return extras


# -- chat -----------------------------------------------------------------------


def chat_logprobs(tokenizer: Any, token_ids: list[int], logprobs: list[dict[int, Any]], top_k: int) -> dict[str, Any]:
    """OpenAI's chat logprobs: the sampled token and the `top_k` most likely ones at each step."""
    content = []
    for token_id, candidates in zip(token_ids, logprobs, strict=False):
        chosen = candidates.get(token_id)
        text = token_text(tokenizer, token_id, chosen)
        ranked = sorted(candidates.items(), key=lambda kv: -kv[1].logprob)[:top_k]
        content.append({
            "token": text,
            "logprob": max(chosen.logprob, -9999.0) if chosen else -9999.0,
            "bytes": list(text.encode()),
            "top_logprobs": [
                {"token": (t := token_text(tokenizer, tid, lp)), "logprob": max(lp.logprob, -9999.0),
                 "bytes": list(t.encode())}
                for tid, lp in ranked
            ],
        })
    return {"content": content}


def chat_response(job: Job, body: ChatCompletionRequest, choices: list[Choice], pipeline: Pipeline) -> ChatCompletion:
    out = []
    for choice in choices:
        calls = job.tool_calls.get(choice.index)
        message = (AssistantMessage(role="assistant", content=choice.text or None,
                                    tool_calls=[call.to_openai() for call in calls])
                   if calls  # the model called the client's own tools: the client runs them
                   else AssistantMessage(role="assistant", content=choice.text))
        logprobs = (chat_logprobs(pipeline.engine.tokenizer, choice.token_ids, choice.logprobs, body.top_logprobs or 0)
                    if body.logprobs else None)
        out.append(ChatChoice(index=choice.index, message=message, logprobs=logprobs,
                              finish_reason=choice.finish_reason or "stop"))
    return ChatCompletion(id=job.request_id, object="chat.completion", created=job.created, model=body.model,
                          choices=out, usage=usage(job),
                          lorag=lorag_extras(job))


async def stream_chat(pipeline: Pipeline, job: Job, body: ChatCompletionRequest,
                      keep: Keep | None = None) -> AsyncIterator[bytes]:
    events = choice_events(job, body, CHAT_CHUNK)
    started: set[int] = set()
    sent: dict[int, Choice] = {}  # what the stream carried, for `keep`
    async for delta in pipeline.generate(job):
        if keep is not None:
            add_delta(sent, delta)
        if delta.index not in started:
            started.add(delta.index)
            yield events.event(opening_choice(delta.index))
        yield _chat_event(pipeline, job, body, events, delta)
    yield event(stream_chunk(job, body, CHAT_CHUNK, [], last=True))
    if keep is not None:  # the whole stream went out: keep it as the non-streamed response it equals
        keep(chat_response(job, body, [sent[i] for i in sorted(sent)], pipeline).model_dump(exclude_unset=True))


def _chat_event(pipeline: Pipeline, job: Job, body: ChatCompletionRequest, events: ChoiceEvents,
                delta: Delta) -> bytes:
    """One delta's event: without logprobs (nearly every one) from plain values, else through pydantic."""
    calls = job.tool_calls.get(delta.index) if delta.finish_reason == "tool_calls" else None
    openai_calls = [{"index": i, **call.to_openai()} for i, call in enumerate(calls)] if calls else None
    if not (body.logprobs and delta.logprobs):
        return events.event(chat_choice(delta.index, delta.text, delta.finish_reason, openai_calls))
    logprobs = chat_logprobs(pipeline.engine.tokenizer, delta.token_ids, delta.logprobs, body.top_logprobs or 0)
    content = ChatDelta(content=delta.text) if delta.text or not delta.finish_reason else ChatDelta()
    if openai_calls:
        content.tool_calls = openai_calls
    choice = ChatChunkChoice(index=delta.index, delta=content, logprobs=logprobs, finish_reason=delta.finish_reason)
    return event(stream_chunk(job, body, CHAT_CHUNK, [choice]))


# -- text completions -----------------------------------------------------------


def completion_logprobs(tokenizer: Any, token_ids: list[int], logprobs: list[dict[int, Any]], offset: int) -> dict[str, Any]:
    tokens, token_logprobs, top, offsets = [], [], [], []
    position = offset
    for token_id, candidates in zip(token_ids, logprobs, strict=False):
        chosen = candidates.get(token_id)
        text = token_text(tokenizer, token_id, chosen)
        tokens.append(text)
        token_logprobs.append(chosen.logprob if chosen else None)
        top.append({token_text(tokenizer, tid, lp): lp.logprob for tid, lp in candidates.items()})
        offsets.append(position)
        position += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


def completion_response(job: Job, body: CompletionRequest, choices: list[Choice], pipeline: Pipeline) -> TextCompletion:
    tokenizer = pipeline.engine.tokenizer
    out = []
    for choice in choices:
        prefix = tokenizer.decode(job.prompts[choice.index // job.n]) if body.echo else ""
        logprobs = (completion_logprobs(tokenizer, choice.token_ids, choice.logprobs, len(prefix))
                    if body.logprobs is not None else None)
        out.append(TextChoice(index=choice.index, text=prefix + choice.text, logprobs=logprobs,
                              finish_reason=choice.finish_reason or "stop"))
    return TextCompletion(id=job.request_id, object="text_completion", created=job.created, model=body.model,
                          choices=out, usage=usage(job),
                          lorag=lorag_extras(job))


async def stream_completion(pipeline: Pipeline, job: Job, body: CompletionRequest,
                            keep: Keep | None = None) -> AsyncIterator[bytes]:
    """A text completion's stream (`keep` is for the shared signature: only chat completions are stored)."""
    tokenizer = pipeline.engine.tokenizer
    events = choice_events(job, body, TEXT_CHUNK)
    echoed: set[int] = set()
    offsets: dict[int, int] = {}
    async for delta in pipeline.generate(job):
        text = delta.text
        if body.echo and delta.index not in echoed:
            echoed.add(delta.index)
            text = tokenizer.decode(job.prompts[delta.index // job.n]) + text
        offset = offsets.get(delta.index, 0)
        offsets[delta.index] = offset + len(text)
        if body.logprobs is None or not delta.logprobs:
            yield events.event(text_choice(delta.index, text, delta.finish_reason))
            continue
        logprobs = completion_logprobs(tokenizer, delta.token_ids, delta.logprobs, offset)
        choice = TextChoice(index=delta.index, text=text, logprobs=logprobs, finish_reason=delta.finish_reason)
        yield event(stream_chunk(job, body, TEXT_CHUNK, [choice]))
    yield event(stream_chunk(job, body, TEXT_CHUNK, [], last=True))
