"""Lanes: bounded sets of daemon threads for the blocking work of the request path.

The event loop carries every stream of every domain, so nothing that may take more than a
few hundred microseconds runs on it: third-party plugin hooks, server-side tools, retrieval
and routing, prompt rendering. Each kind of work has a lane of its own, so a stuck tool cannot
take the threads that input hooks or retrieval need (the loop's default executor has only
cpu + 4 of them, and `asyncio.wait_for(asyncio.to_thread(...))` leaves a timed-out call
running in one of them).

A call waits for a free place in its lane, runs in one of the lane's daemon threads (a call that
never returns never holds the process up at exit), and gives its place back when the function
returns — not when the caller stops waiting. Threads are kept for the next call (starting one
blocks the event loop until the new thread first holds the GIL: about a quarter of the loop's
time under load, benchmarks/stored_completions.py) and end after IDLE_S without work. So a call abandoned on timeout keeps its place until it
really ends, and a lane full of stuck calls makes later calls wait (and time out) instead of
piling up threads. Lanes are process-wide and not tied to an event loop: `lorag chat`, the
server and the tests each run their own loops.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import queue
import threading
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import Field

from lorag.schema import Strict

T = TypeVar("T")
IDLE_S = 60.0  # a lane thread with no work for this long ends


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
        self._idle: list[_Worker] = []  # threads waiting for work, the last to finish on top

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

            def work(worker: _Worker) -> None:
                try:
                    outcome: tuple[Any, BaseException | None] = (context.run(function, *args), None)
                except BaseException as err:  # noqa: BLE001 - handed to the caller as is
                    outcome = (None, err)
                with self._lock:  # idle before the place is free: the next call finds this thread
                    self._idle.append(worker)
                self._release()  # before settling: the place is free by the time the caller has the result
                _settle(loop, result, *outcome)

            try:
                self._dispatch(work)
            except BaseException:
                self._release()
                raise
            return await result

    def _dispatch(self, work: Callable[[_Worker], None]) -> None:
        """Hand a call to an idle thread of the lane, or start one (at most `size` are ever busy)."""
        with self._lock:
            worker = self._idle.pop() if self._idle else None
        if worker is not None:
            worker.inbox.put(work)
        else:
            _Worker(self, work)

    def _retire(self, worker: _Worker) -> bool:
        """Whether an idle thread may end: not if a call was just handed to it."""
        with self._lock:
            if worker in self._idle:
                self._idle.remove(worker)
                return True
            return False

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


class _Worker:
    """One daemon thread of a lane: runs the calls handed to it until it has been idle IDLE_S."""

    def __init__(self, lane: Lane, first: Callable[[_Worker], None]) -> None:
        self.lane = lane
        self.inbox: queue.SimpleQueue[Callable[[_Worker], None]] = queue.SimpleQueue()
        threading.Thread(target=self._loop, args=(first,), name=f"lorag-{lane.name}", daemon=True).start()

    def _loop(self, work: Callable[[_Worker], None]) -> None:
        while True:
            work(self)  # puts this worker back on the lane's idle list when the call returns
            try:
                work = self.inbox.get(timeout=IDLE_S)
            except queue.Empty:
                if self.lane._retire(self):
                    return
                work = self.inbox.get()  # a call was handed over just as the wait ended


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
