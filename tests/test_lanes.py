"""Lanes (lorag.lanes) and merged streams (lorag.serving.merge): pure logic, no server."""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import AsyncGenerator

import pytest

from lorag.lanes import Lane
from lorag.serving.merge import merged

REQUEST = contextvars.ContextVar("request", default="")


def test_a_lane_runs_at_most_its_size_and_the_rest_in_order() -> None:
    lane = Lane("test", 2)
    release = threading.Event()
    started: list[int] = []

    def work(number: int) -> int:
        started.append(number)
        release.wait(60)
        return number * 10

    async def main() -> list[int]:
        tasks = [asyncio.create_task(lane.run(work, n)) for n in range(5)]
        while len(started) < 2:
            await asyncio.sleep(0.01)
        assert lane.busy == 2 and lane.queued == 3 and sorted(started) == [0, 1]
        release.set()
        return list(await asyncio.gather(*tasks))

    assert asyncio.run(main()) == [0, 10, 20, 30, 40]
    assert sorted(started) == [0, 1, 2, 3, 4] and lane.busy == 0 and lane.queued == 0

    one_at_a_time = Lane("test", 1)  # with one place, the waiting calls run in the order they came
    order: list[int] = []

    async def queue_up() -> None:
        await asyncio.gather(*(one_at_a_time.run(order.append, n) for n in range(5)))

    asyncio.run(queue_up())
    assert order == [0, 1, 2, 3, 4]


def test_a_timed_out_call_keeps_its_place_until_it_really_returns() -> None:
    lane = Lane("test", 1)
    stuck = threading.Event()

    async def main() -> None:
        with pytest.raises(TimeoutError):
            await lane.run(stuck.wait, 60, timeout=0.05)  # runs on in its thread
        assert lane.busy == 1
        with pytest.raises(TimeoutError):  # a full lane: the next call times out waiting for a place
            await lane.run(lambda: "never", timeout=0.05)
        assert lane.queued == 0  # it left the queue when it gave up
        stuck.set()
        assert await lane.run(lambda: "after", timeout=60) == "after"

    asyncio.run(main())
    assert lane.busy == 0


def test_a_lane_serves_one_event_loop_after_another_with_the_callers_context() -> None:
    lane = Lane("test", 1)

    async def main(name: str) -> str:
        REQUEST.set(name)
        return await lane.run(REQUEST.get)

    assert asyncio.run(main("first")) == "first"
    assert asyncio.run(main("second")) == "second"


def test_a_lane_keeps_its_threads_for_the_next_calls_and_never_runs_more_than_its_size() -> None:
    lane = Lane("reused", 2)

    async def main() -> tuple[set[int], set[int]]:
        one_by_one = {await lane.run(threading.get_ident) for _ in range(5)}
        barrier = threading.Barrier(2, timeout=60)  # two calls at once need two threads

        def together() -> int:
            barrier.wait()
            return threading.get_ident()

        at_once = set(await asyncio.gather(*(lane.run(together) for _ in range(2))))
        return one_by_one, at_once | {await lane.run(threading.get_ident) for _ in range(5)}

    one_by_one, after = asyncio.run(main())
    assert len(one_by_one) == 1  # one thread served every call in turn
    assert len(after) == 2 and one_by_one < after  # the second thread joined it, and no third
    assert sum(thread.name == "lorag-reused" for thread in threading.enumerate()) <= 2


def test_errors_come_back_to_the_caller() -> None:
    def fail() -> None:
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        asyncio.run(Lane("test", 1).run(fail))


async def counting(name: str, count: int, log: list[str], fail_at: int | None = None) -> AsyncGenerator[str, None]:
    try:
        for i in range(count):
            await asyncio.sleep(0)
            if i == fail_at:
                raise RuntimeError(f"{name} failed")
            yield f"{name}{i}"
    finally:
        log.append(f"{name} closed")


def test_merged_streams_run_at_once_and_keep_each_ones_order() -> None:
    log: list[str] = []

    async def main() -> list[str]:
        return [item async for item in merged([counting("a", 3, log), counting("b", 3, log)])]

    items = asyncio.run(main())
    assert [i for i in items if i[0] == "a"] == ["a0", "a1", "a2"] and len(items) == 6
    assert items.index("b0") < items.index("a2")  # interleaved, not one after the other
    assert sorted(log) == ["a closed", "b closed"]


def test_a_failing_stream_stops_the_others_and_closing_closes_all() -> None:
    log: list[str] = []

    async def failing() -> None:
        async for _ in merged([counting("a", 100, log), counting("b", 100, log, fail_at=2)]):
            pass

    with pytest.raises(RuntimeError, match="b failed"):
        asyncio.run(failing())
    assert sorted(log) == ["a closed", "b closed"]
    log.clear()

    async def leave_early() -> None:
        stream = merged([counting("a", 100, log), counting("b", 100, log)])
        async for _ in stream:
            break
        await stream.aclose()

    asyncio.run(leave_early())
    assert sorted(log) == ["a closed", "b closed"]
