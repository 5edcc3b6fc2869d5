"""The generation deadline of a request (`[server.limits] generation_timeout_s`), streamed or not.

Past it the engine request is aborted and the client gets a 504, or an error event in a stream.
A stream's deadline covers each wait for the next chunk, never the consumer's own work.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from lorag.errors import LoragError
from lorag.logging import get_logger

log = get_logger("lorag.limits")
T = TypeVar("T")


class GenerationTimeout(LoragError):
    status_code = 504
    error_type = "server_error"
    code = "generation_timeout"


class Guard:
    """The generation deadline of one job, for a streamed or a non-streamed answer.

    Past it the engine request is aborted (cancelling the work closes the engine's
    stream, which aborts it) and the client gets a 504, or an error event in a stream.
    """

    def __init__(self, deadline: float | None, timeout_s: float,
                 settle: Callable[[], None] | None = None) -> None:
        self.deadline = deadline
        self.timeout_s = timeout_s
        self.settle = settle or (lambda: None)  # runs once the answer is over, however it ended

    def _expired(self) -> GenerationTimeout:
        log.warning("generation_timeout", timeout_s=self.timeout_s)
        return GenerationTimeout(f"Generation took longer than {self.timeout_s:g} s "
                                 "(server.limits.generation_timeout_s) and was stopped.")

    async def run(self, work: Awaitable[T]) -> T:
        try:
            if self.deadline is None:
                return await work
            async with asyncio.timeout_at(_loop_time(self.deadline)):
                return await work
        except TimeoutError:
            raise self._expired() from None
        finally:
            self.settle()

    async def stream(self, chunks: AsyncIterator[T]) -> AsyncIterator[T]:
        """The deadline applies to each wait for the next chunk, never across a `yield`
        (a timeout there would cancel whoever consumes this generator)."""
        if self.deadline is None:
            try:
                async for chunk in chunks:
                    yield chunk
            finally:
                self.settle()
            return
        iterator = aiter(chunks)
        deadline = StreamDeadline(_loop_time(self.deadline))
        try:
            while True:
                try:
                    chunk = await deadline.next(iterator)
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    raise self._expired() from None
                yield chunk
        finally:
            deadline.stop()
            closer = getattr(iterator, "aclose", None)
            if closer is not None:
                await closer()
            self.settle()


class StreamDeadline:
    """One timer for a whole stream that cancels the task only while it waits for the next chunk.

    asyncio.timeout around each wait would do the same, but sets and cancels a timer per token:
    more than the rest of lorag's own work for a token on the fleet's streaming path.
    """

    def __init__(self, when: float) -> None:
        self.expired = False
        self._waiting: asyncio.Task[Any] | None = None  # the task inside next(), if any
        self._cancelled = False  # this deadline cancelled that task (and must take it back)
        self._timer = asyncio.get_running_loop().call_at(when, self._expire)

    def _expire(self) -> None:
        self.expired = True
        if self._waiting is not None:
            self._cancelled = True
            self._waiting.cancel()

    async def next(self, iterator: AsyncIterator[T]) -> T:
        """The iterator's next item; TimeoutError once the deadline passed (as asyncio.timeout)."""
        if self.expired:
            raise TimeoutError
        task = asyncio.current_task()
        assert task is not None
        before = task.cancelling()
        self._waiting = task
        try:
            return await anext(iterator)
        except asyncio.CancelledError:
            if self._cancelled and task.uncancel() <= before:
                raise TimeoutError from None
            raise
        finally:
            self._waiting = None
            if self._cancelled and task.cancelling() > before:  # it expired as the item came: take it back
                task.uncancel()
            self._cancelled = False

    def stop(self) -> None:
        self._timer.cancel()


def _loop_time(deadline: float) -> float:
    """A time.monotonic() deadline on the running loop's clock."""
    return asyncio.get_running_loop().time() + (deadline - time.monotonic())
