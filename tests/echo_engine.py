"""A fake engine for fast tests of the request path: no vLLM engine, answers in microseconds.

It satisfies lorag.serving.generation.TextEngine like the real lorag.engine.Engine does,
in the spirit of simonw/llm's mock models: queue the replies a test wants (a string, or a
function of the prompt and adapter), and it streams them back; with nothing queued it echoes
the last user turn. Every call is recorded (prompt text, sampling parameters, adapter) so a
test can check what the pipeline asked for. The tokenizer is one token per character, so
token counts are string lengths.
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Any

Reply = str | Callable[[str, str | None], str]


class CharTokenizer:
    """One token per character; chat turns rendered as `<|role|>content<|end|>`."""

    def __len__(self) -> int:
        return 0x110000

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, token_ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(chr(t) for t in token_ids)

    def get_vocab(self) -> dict[str, int]:
        return {}

    def apply_chat_template(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                            tokenize: bool = False, add_generation_prompt: bool = True) -> str:
        text = f"<|tools|>{json.dumps(tools)}<|end|>" if tools else ""
        text += "".join(f"<|{m['role']}|>{m.get('content') or ''}<|end|>" for m in messages)
        return text + ("<|assistant|>" if add_generation_prompt else "")


@dataclass
class Completion:
    index: int
    text: str
    token_ids: list[int]
    logprobs: Any = None
    finish_reason: str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class Output:
    outputs: list[Completion]
    finished: bool


@dataclass
class Call:
    prompt: str
    params: Any
    adapter: str | None
    request_id: str


@dataclass
class EchoEngine:
    max_model_len: int = 4096
    chunk_chars: int = 3  # characters per streamed delta
    replies: deque[Reply] = field(default_factory=deque)
    calls: list[Call] = field(default_factory=list)
    tokenizer: CharTokenizer = field(default_factory=CharTokenizer)

    def reply(self, *replies: Reply) -> EchoEngine:
        """Queue answers, one per generation (each choice of n takes one)."""
        self.replies.extend(replies)
        return self

    async def generate(self, prompt_token_ids: list[int], params: Any, request_id: str,
                       adapter: Any) -> AsyncGenerator[Output, None]:
        prompt = self.tokenizer.decode(prompt_token_ids)
        adapter_ref = adapter.ref if adapter is not None else None
        self.calls.append(Call(prompt, params, adapter_ref, request_id))
        answers = [self._answer(prompt, adapter_ref, params) for _ in range(params.n)]
        if params.output_kind.name == "FINAL_ONLY":
            yield Output([Completion(i, text, self.tokenizer.encode(text), finish_reason=reason)
                          for i, (text, reason) in enumerate(answers)], finished=True)
            return
        longest = max((len(text) for text, _ in answers), default=0)
        for start in range(0, max(longest, 1), self.chunk_chars):
            await asyncio.sleep(0)  # a real engine yields to the loop between steps
            end = start + self.chunk_chars
            step = []
            for i, (text, reason) in enumerate(answers):
                if start < len(text) or (start == 0 and not text):
                    piece = text[start:end]
                    step.append(Completion(i, piece, self.tokenizer.encode(piece),
                                           finish_reason=reason if end >= len(text) else None))
            yield Output(step, finished=end >= longest)

    def _answer(self, prompt: str, adapter: str | None, params: Any) -> tuple[str, str]:
        """(text, finish reason) after the request's stop strings and max_tokens."""
        reply = self.replies.popleft() if self.replies else None
        if reply is None:
            text = f"echo: {last_user_turn(prompt)}"
        else:
            text = reply if isinstance(reply, str) else reply(prompt, adapter)
        for stop in params.stop or []:
            if stop in text:
                return text[:text.index(stop)], "stop"
        if params.max_tokens is not None and len(text) > params.max_tokens:
            return text[:params.max_tokens], "length"
        return text, "stop"


def last_user_turn(prompt: str) -> str:
    start = prompt.rfind("<|user|>")
    if start < 0:
        return prompt
    start += len("<|user|>")
    return prompt[start:prompt.find("<|end|>", start)]
