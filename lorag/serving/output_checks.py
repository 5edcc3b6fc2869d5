"""Stage 5: one prompt's choices through the output hooks: hold-back filters while streaming,
validators when a choice ends (pass / fix / retry / refuse), then formatters.

A retry asks the model again with the rejected answer and the validator's message appended
to the conversation; it replaces the whole answer, so it is only possible before any text of
that choice was sent, which the hold-back filters guarantee.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any

from lorag.logging import get_logger
from lorag.serving.generation import Generator
from lorag.serving.jobs import Delta, Job

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
        streams: dict[int, Any] = {}
        sent: dict[int, str] = {}
        done: set[int] = set()  # choices that finished or were blocked
        retry = None
        source = first if attempt == 0 and first is not None else generator.deltas(
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
        prompt = retry_prompt(generator, job, *retry)
    raise AssertionError("unreachable: the last attempt either returns or raises")


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
