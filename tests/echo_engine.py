"""A fake engine for fast tests of the request path: no vLLM engine, answers in microseconds.

It satisfies lorag.serving.generation.TextEngine like the real lorag.engine.Engine does,
in the spirit of simonw/llm's mock models: queue the replies a test wants (a string, a
function of the prompt and adapter, or `Aborted`), and it streams them back; with nothing
queued it echoes the last user turn. Every call is recorded (prompt text, sampling
parameters, adapter) so a test can check what the pipeline asked for. The tokenizer is one
token per character, so token counts are string lengths; asked for logprobs, each token gets
made-up ones (its own at rank 1).

It is also a whole serving engine for `create_app(settings, engine=EchoEngine())`: adapters
are loaded and retired through lorag's own leases (lorag.adapters.leases), and like vLLM's
worker it reads an adapter's folder when a request first needs it: a folder that is gone by
then kills it (`alive` turns False), as it killed vLLM's engine core.
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorag.adapters.leases import AdapterLeases, Lease


@dataclass(frozen=True)
class Aborted:
    """A reply the engine gives up on after `text`: finish_reason "abort", as vLLM reports one."""

    text: str = ""


Reply = str | Callable[[str, str | None], str] | Aborted


@dataclass(frozen=True)
class EchoLogprob:
    """Shaped like vLLM's Logprob."""

    logprob: float
    rank: int
    decoded_token: str


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
    step_s: float = 0.0  # pause before each delta (a real engine's pace; benchmarks/hook_stall.py)
    replies: deque[Reply] = field(default_factory=deque)
    calls: list[Call] = field(default_factory=list)
    tokenizer: CharTokenizer = field(default_factory=CharTokenizer)
    alive: bool = True
    loaded: set[str] = field(default_factory=set)  # adapter refs loaded and not yet released
    running: int = 0  # generations under way (started, not finished)
    most_running: int = 0

    def __post_init__(self) -> None:
        self.leases = AdapterLeases(self._release)

    def reply(self, *replies: Reply) -> EchoEngine:
        """Queue answers, one per generation (each choice of n takes one)."""
        self.replies.extend(replies)
        return self

    # -- what a serving engine has besides generate ----------------------------------

    started = True

    @property
    def loaded_adapters(self) -> int:
        return len(self.loaded)

    async def start(self) -> None:
        pass

    async def shutdown(self) -> None:
        pass

    async def check_health(self) -> None:
        from lorag.errors import EngineUnavailable

        if not self.alive:
            raise EngineUnavailable("The echo engine died.")

    async def load_adapter(self, adapter: Any) -> None:
        self.loaded.add(adapter.ref)

    def hold(self, adapter: Any) -> Lease:
        return self.leases.hold(adapter)

    def retire_adapter(self, adapter: Any, on_released: Callable[[], Any] | None = None) -> None:
        self.leases.retire(adapter, on_released)

    def _release(self, adapter: Any, on_released: Callable[[], Any] | None) -> None:
        self.loaded.discard(adapter.ref)
        if on_released is not None:
            on_released()

    # -- generation ----------------------------------------------------------------

    async def generate(self, prompt_token_ids: list[int], params: Any, request_id: str,
                       adapter: Any) -> AsyncGenerator[Output, None]:
        from lorag.errors import EngineUnavailable

        if not self.alive:
            raise EngineUnavailable("The echo engine died.")
        prompt = self.tokenizer.decode(prompt_token_ids)
        adapter_ref = adapter.ref if adapter is not None else None
        self.calls.append(Call(prompt, params, adapter_ref, request_id))
        if adapter is not None and not (Path(adapter.path) / "adapter_config.json").exists():
            self.alive = False  # vLLM's worker: FileNotFoundError, then EngineDeadError for everyone
            raise EngineUnavailable(f"The engine core died: no adapter_config.json in {adapter.path}")
        answers = [self._answer(prompt, adapter_ref, params) for _ in range(params.n)]
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            with self.leases.hold(adapter):
                async for output in self._outputs(answers, params):
                    yield output
        finally:
            self.running -= 1

    async def _outputs(self, answers: list[tuple[str, str]], params: Any) -> AsyncGenerator[Output, None]:
        if params.output_kind.name == "FINAL_ONLY":
            await asyncio.sleep(0)
            yield Output([self._completion(i, text, params, reason) for i, (text, reason) in enumerate(answers)],
                         finished=True)
            return
        longest = max((len(text) for text, _ in answers), default=0)
        for start in range(0, max(longest, 1), self.chunk_chars):
            await asyncio.sleep(self.step_s)  # a real engine yields to the loop between steps
            end = start + self.chunk_chars
            step = []
            for i, (text, reason) in enumerate(answers):
                if start < len(text) or (start == 0 and not text):
                    step.append(self._completion(i, text[start:end], params, reason if end >= len(text) else None))
            yield Output(step, finished=end >= longest)

    def _completion(self, index: int, text: str, params: Any, reason: str | None) -> Completion:
        ids = self.tokenizer.encode(text)
        logprobs = None
        if params.logprobs is not None:  # the token itself at rank 1, then `logprobs` made-up alternatives
            logprobs = [{tid: EchoLogprob(-0.5, 1, chr(tid)),
                         **{ord("a") + k: EchoLogprob(-2.0 - k, 2 + k, chr(ord("a") + k))
                            for k in range(params.logprobs) if ord("a") + k != tid}} for tid in ids]
        return Completion(index, text, ids, logprobs, finish_reason=reason)

    def _answer(self, prompt: str, adapter: str | None, params: Any) -> tuple[str, str]:
        """(text, finish reason) after the request's stop strings and max_tokens."""
        reply = self.replies.popleft() if self.replies else None
        if reply is None:
            text = f"echo: {last_user_turn(prompt)}"
        elif isinstance(reply, Aborted):
            return reply.text, "abort"
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
