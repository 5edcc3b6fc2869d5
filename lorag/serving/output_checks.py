"""Stage 5: one prompt's choices through the output hooks: hold-back filters while streaming,
validators when a choice ends (pass / fix / retry / refuse), then formatters.

A retry asks the model again with the rejected answer and the validator's message appended
to the conversation; it replaces the whole answer, so it is only possible before any text of
that choice was sent, which the hold-back filters guarantee.

Third-party hooks run off the event loop (RequestHooks' async twins), so a slow validator
delays its own request only. Token ids and logprobs go out with the text they belong to
(lorag.serving.token_release); `counts` keeps every attempt's tokens for `usage`.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any

from lorag import lanes
from lorag.logging import get_logger
from lorag.plugins.host import RequestHooks
from lorag.serving.generation import Generator
from lorag.serving.jobs import Delta, Job
from lorag.serving.token_release import TokenRelease

log = get_logger("lorag.request")


async def checked_output(generator: Generator, job: Job, prompt_index: int, prompt: list[int],
                         counts: dict[str, int], started: float,
                         first: AsyncGenerator[Delta, None] | None = None) -> AsyncGenerator[Delta, None]:
    """The deltas the client sees, after every output hook (with retries).

    `first`: deltas already generated (the tool loop's last step) to use instead of the engine's
    on the first attempt.
    """
    hooks = job.hooks
    for attempt in range(hooks.max_retries + 1):
        choices: dict[int, _Choice] = {}
        retry = None
        source = first if attempt == 0 and first is not None else generator.deltas(
            job, prompt_index, prompt, counts, started)
        async with aclosing(source) as raw_deltas:
            async for raw in raw_deltas:
                choice = choices.get(raw.index)
                if choice is None:
                    choice = choices[raw.index] = _Choice(hooks, raw.index, generator, job)
                if choice.done:
                    continue  # blocked earlier; the engine still produces its siblings
                delta, verdict = await choice.check(raw, job)
                if verdict is not None:  # a validator asked for another attempt
                    if not (job.can_retry and attempt < hooks.max_retries):
                        raise hooks.rejection(verdict)
                    retry = (choice.stream.text, verdict.message or "")
                    break
                yield delta
                if sum(c.done for c in choices.values()) == job.n:
                    break  # every choice is over: closing the stream aborts what the engine still runs
        if retry is None:
            job.extras["attempts"] = attempt + 1
            return
        prompt = await lanes.PROMPTS.run(retry_prompt, generator, job, *retry)
    raise AssertionError("unreachable: the last attempt either returns or raises")


class _Choice:
    """One choice of one attempt: its filter stream, what was sent, and its tokens."""

    def __init__(self, hooks: RequestHooks, index: int, generator: Generator, job: Job) -> None:
        self.hooks = hooks
        self.index = index
        self.stream = hooks.output_stream(index)
        self.sent = ""
        self.done = False
        # Tokens only wait for their text where hooks may hold text back or change it, and only
        # matter to a client that asked for logprobs (usage comes from the engine's counts).
        self.passthrough = not hooks.changes_output
        self.tokens = TokenRelease(generator.engine.tokenizer) if job.wants_logprobs and not self.passthrough else None

    async def check(self, raw: Delta, job: Job) -> tuple[Delta, Any]:
        """The delta to send for `raw`, or (_, the verdict) when a validator wants a retry."""
        hooks, stream = self.hooks, self.stream
        if self.tokens is not None:
            self.tokens.add(raw.text, raw.token_ids, raw.logprobs)
        text = await hooks.afeed(stream, raw.text)
        finish = raw.finish_reason
        final_text = None
        if stream.blocked is None and finish is not None:
            text += await hooks.afinish(stream)
        if stream.blocked is not None:
            text, finish = text + _refusal(self.sent + text, stream.blocked), "content_filter"
        elif finish is not None:
            verdict = await hooks.aoutput_complete(stream.text, self.index)
            if verdict.action == "retry":
                return Delta(self.index, "", [], None, None), verdict
            if verdict.action == "refuse":
                text, finish = text + _refusal(self.sent + text, verdict.message or ""), "content_filter"
            else:
                final_text, updates = await hooks.aformat(verdict.text, {"lorag": {}}, job.citations, self.index)
                job.extras.update(updates.get("lorag") or {})
                text = final_text[len(self.sent):]
        self.sent += text
        self.done = finish is not None
        return Delta(self.index, text, *self._tokens(raw, final_text), finish), None

    def _tokens(self, raw: Delta, final_text: str | None) -> tuple[list[int], Any]:
        if self.passthrough:
            return raw.token_ids, raw.logprobs
        if self.tokens is None:
            return [], None
        return self.tokens.release(self.stream, final_text)


def retry_prompt(generator: Generator, job: Job, answer: str, message: str) -> list[int]:
    """The conversation plus the rejected answer and the validator's message, as the next prompt."""
    assert job.messages is not None
    job.messages = [*job.messages, {"role": "assistant", "content": answer}, {"role": "user", "content": message}]
    prompt = generator.chat_prompt(job.messages)
    # What the client asked for, else what the longer prompt leaves (not the first attempt's room).
    budget = generator.output_budget(len(prompt), job.requested_max_tokens)
    if budget != job.params.max_tokens:
        job.params = job.params.clone()
        job.params.max_tokens = budget
    log.info("retry", reason=message[:200])
    return prompt


def _refusal(sent: str, message: str) -> str:
    """The block message, on its own paragraph when part of the answer was already sent."""
    return f"\n\n{message}" if sent else message
