"""vLLM's SamplingParams -> a /v1/completions body, and the server's chunks -> objects shaped
like vLLM's RequestOutput, so the request path reads a remote answer as it reads a local one."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

# SamplingParams fields a completions request takes under the same name.
_SAME_NAME = ("n", "temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty", "frequency_penalty",
              "repetition_penalty", "max_tokens", "min_tokens", "ignore_eos", "logprobs",
              "include_stop_str_in_output", "skip_special_tokens", "spaces_between_special_tokens",
              "allowed_token_ids", "logit_bias", "bad_words")


def completion_body(model: str, prompt_token_ids: list[int], params: Any, request_id: str,
                    stream_interval: int = 1) -> dict[str, Any]:
    """The streamed /v1/completions request that samples like `params` would in process."""
    body: dict[str, Any] = {"model": model, "prompt": list(prompt_token_ids), "stream": True,
                            "return_token_ids": True, "request_id": request_id}
    if stream_interval > 1:
        body["stream_interval"] = stream_interval
    for name in _SAME_NAME:
        value = getattr(params, name, None)
        if value is not None and value != [] and value != {}:
            body[name] = value
    if params.stop:
        body["stop"] = list(params.stop)
    if params.stop_token_ids:
        body["stop_token_ids"] = list(params.stop_token_ids)
    if params.logprobs is not None:
        body["return_tokens_as_token_ids"] = True  # "token_id:123": logprobs keyed by id, as in process
    constraint = getattr(params, "structured_outputs", None)
    if constraint is not None:
        body["structured_outputs"] = {k: v for k, v in dataclasses.asdict(constraint).items()
                                      if v not in (None, False) and not k.startswith("_")}
    return body


@dataclass
class TokenLogprob:
    """One candidate token's log-probability (vLLM's Logprob, as lorag reads it)."""

    logprob: float
    decoded_token: str | None = None


@dataclass
class RemoteCompletion:
    """One choice's new output (vLLM's CompletionOutput, as lorag reads it)."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, TokenLogprob]] | None = None
    finish_reason: str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None

    def extend(self, other: RemoteCompletion) -> None:
        self.text += other.text
        self.token_ids += other.token_ids
        if other.logprobs is not None:
            self.logprobs = (self.logprobs or []) + other.logprobs
        self.finish_reason = other.finish_reason or self.finish_reason


@dataclass
class RemoteOutput:
    outputs: list[RemoteCompletion]
    finished: bool = False


def chunk_output(chunk: dict[str, Any]) -> RemoteOutput:
    """One server-sent chunk of a completions stream as a RequestOutput-like delta."""
    return RemoteOutput([_completion(choice) for choice in chunk.get("choices") or ()])


def hold(held: dict[int, RemoteCompletion], chunk: dict[str, Any]) -> None:
    """Add a chunk's choices to what is held per choice: the first part of a choice is kept as is
    (one object per token on the streaming path), later ones are appended to it."""
    for choice in chunk.get("choices") or ():
        part = _completion(choice)
        earlier = held.get(part.index)
        if earlier is None:
            held[part.index] = part
        else:
            earlier.extend(part)


def _completion(choice: dict[str, Any]) -> RemoteCompletion:
    logprobs = choice.get("logprobs")
    return RemoteCompletion(int(choice.get("index", 0)), choice.get("text") or "", choice.get("token_ids") or [],
                            _logprobs(logprobs) if logprobs else None, choice.get("finish_reason"))


def _logprobs(raw: dict[str, Any] | None) -> list[dict[int, TokenLogprob]] | None:
    """Completions logprobs with tokens as "token_id:N" -> one {token id: logprob} per position."""
    if not raw:
        return None
    steps: list[dict[int, TokenLogprob]] = []
    tops = raw.get("top_logprobs") or []
    for position, (token, logprob) in enumerate(zip(raw.get("tokens") or [], raw.get("token_logprobs") or [],
                                                    strict=False)):
        candidates = {_token_id(t): TokenLogprob(lp) for t, lp in (tops[position] or {}).items()} \
            if position < len(tops) and tops[position] else {}
        candidates.setdefault(_token_id(token), TokenLogprob(logprob if logprob is not None else float("-inf")))
        steps.append(candidates)
    return steps


def _token_id(token: str) -> int:
    return int(token.removeprefix("token_id:"))
