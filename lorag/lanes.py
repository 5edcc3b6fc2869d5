"""Lanes: bounded sets of daemon threads for the blocking work of the request path.

The event loop carries every stream of every domain, so nothing that may take more than a
few hundred microseconds runs on it: third-party plugin hooks, server-side tools, retrieval
and routing, prompt rendering. Each kind of work has a lane of its own, so a stuck tool cannot
take the threads that input hooks or retrieval need (the loop's default executor has only
cpu + 4 of them, and `asyncio.wait_for(asyncio.to_thread(...))` leaves a timed-out call
running in one of them).

A call waits for a free place in its lane, runs in a daemon thread (a call that never returns
never holds the process up at exit), and gives its place back when the function returns —
not when the caller stops waiting. So a call abandoned on timeout keeps its place until it
really ends, and a lane full of stuck calls makes later calls wait (and time out) instead of
piling up threads. Lanes are process-wide and not tied to an event loop: `lorag chat`, the
server and the tests each run their own loops.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import threading
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import Field

from lorag.schema import Strict

T = TypeVar("T")


class LaneSettings(Strict):
    """`[threads]`: how many calls of each kind may run at once (docs/operations.md)."""

    hooks: int = Field(default=32, ge=1, description="Third-party plugin hooks (each within hook_timeout_s).")
    tools: int = Field(default=16, ge=1, description="Server-side tool calls (each within tools.timeout_s).")
    knowledge: int = Field(default=4, ge=1, description="Retrieval and `auto` routing (CPU-bound).")
    # One, as vLLM does: a fast tokeniser changed from two threads at once can fail ("Already borrowed").
    prompts: int = Field(default=1, ge=1, description="Chat templates and tokenisation.")


class Lane:
    """At most `size` calls at a time, each in a daemon thread; the rest wait in order."""

    def __init__(self, name: str, size: int) -> None:
        self.name = name
        self.size = size
        self._lock = threading.Lock()
        self._busy = 0
        self._waiting: deque[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = deque()

    @property
    def busy(self) -> int:
        """Calls running now (abandoned ones included, until they return)."""
        return self._busy

    @property
    def queued(self) -> int:
        return len(self._waiting)

    async def run(self, function: Callable[..., T], *args: Any, timeout: float | None = None) -> T:
        """`function(*args)` in this lane; `timeout` covers the wait for a place and the call.

        TimeoutError past it; the call itself (if it started) runs on and keeps its place.
        The caller's context variables (the request id in logs) go with it.
        """
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            await self._acquire(loop)
            result: asyncio.Future[T] = loop.create_future()
            context = contextvars.copy_context()

            def work() -> None:
                try:
                    outcome: tuple[Any, BaseException | None] = (context.run(function, *args), None)
                except BaseException as err:  # noqa: BLE001 - handed to the caller as is
                    outcome = (None, err)
                self._release()  # first: the place is free by the time the caller has the result
                _settle(loop, result, *outcome)

            try:
                threading.Thread(target=work, name=f"lorag-{self.name}", daemon=True).start()
            except BaseException:
                self._release()
                raise
            return await result

    async def _acquire(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._lock:
            if self._busy < self.size and not self._waiting:
                self._busy += 1
                return
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiting.append((loop, waiter))
        try:
            await waiter  # a finished call hands its place over (the busy count stays)
        except BaseException:
            with self._lock:
                if (loop, waiter) in self._waiting:  # never handed a place: just leave the queue
                    self._waiting.remove((loop, waiter))
                    raise
            if waiter.done() and not waiter.cancelled():  # handed a place, then cancelled: give it on
                self._release()
            raise

    def _release(self) -> None:
        """Hand the place to the next waiter (on its own loop), or free it. Any thread may call."""
        with self._lock:
            while self._waiting:
                loop, waiter = self._waiting.popleft()
                try:
                    loop.call_soon_threadsafe(self._wake, waiter)
                    return
                except RuntimeError:  # that waiter's loop is closed: try the next one
                    continue
            self._busy -= 1

    def _wake(self, waiter: asyncio.Future[None]) -> None:
        if waiter.cancelled():  # it gave up after it was handed the place: pass it on
            self._release()
        else:
            waiter.set_result(None)


def _settle(loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any], value: Any,
            error: BaseException | None) -> None:
    def settle() -> None:
        if future.done():  # the caller stopped waiting (timeout, cancel)
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)

    with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits for this result
        loop.call_soon_threadsafe(settle)


HOOKS = Lane("hooks", LaneSettings().hooks)
TOOLS = Lane("tools", LaneSettings().tools)
KNOWLEDGE = Lane("knowledge", LaneSettings().knowledge)
PROMPTS = Lane("prompts", LaneSettings().prompts)
ALL = (HOOKS, TOOLS, KNOWLEDGE, PROMPTS)


def configure(settings: LaneSettings) -> None:
    """Resize the process's lanes (a smaller size applies as running calls end)."""
    for lane in ALL:
        lane.size = getattr(settings, lane.name)
