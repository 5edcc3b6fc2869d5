"""The remote engine's streaming against stand-in servers that fail on cue: a retry before the first
token, a clear error after it, and the upstream request closed when lorag stops reading. The real
vLLM servers are in test_fleet.py; these cases need a server that breaks at an exact moment."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route
from vllm import SamplingParams
from vllm.sampling_params import RequestOutputKind

from lorag.config import Settings
from lorag.errors import EngineUnavailable
from lorag.fleet.engine import RemoteEngine
from tests.conftest import free_port

T = TypeVar("T")


@dataclass
class StandIn:
    """A server that streams `chunks` completion chunks, `every_s` apart, failing as told."""

    # "ok" | "refuse" (500 before any output) | "unknown" (404) | "break" (drop after 3 chunks) |
    # "textless" (3 chunks whose tokens decode to no text yet, then drop)
    mode: str = "ok"
    chunks: int = 200
    every_s: float = 0.02
    sent: int = 0
    closed_early: threading.Event = field(default_factory=threading.Event)

    def app(self) -> Starlette:
        async def completions(request: Request) -> object:
            await request.json()
            if self.mode == "refuse":
                return JSONResponse({"error": {"message": "engine dead", "code": 500}}, status_code=500)
            if self.mode == "unknown":
                return JSONResponse({"error": {"message": "The model does not exist.", "code": 404}}, status_code=404)

            async def events() -> AsyncIterator[str]:
                try:
                    for i in range(self.chunks):
                        if self.mode in ("break", "textless") and i == 3:
                            raise RuntimeError("the server died")  # uvicorn drops the connection
                        text = "" if self.mode == "textless" else f"t{i} "
                        choice = {"index": 0, "text": text, "token_ids": [i],
                                  "finish_reason": "length" if i == self.chunks - 1 else None}
                        self.sent += 1
                        yield f"data: {json.dumps({'choices': [choice]})}\n\n"
                        await asyncio.sleep(self.every_s)
                    yield "data: [DONE]\n\n"
                except asyncio.CancelledError:
                    self.closed_early.set()
                    raise

            return StreamingResponse(events(), media_type="text/event-stream")

        async def health(request: Request) -> JSONResponse:
            return JSONResponse({})

        return Starlette(routes=[Route("/v1/completions", completions, methods=["POST"]),
                                 Route("/health", health)])


@pytest.fixture
def stand_ins() -> Iterator[tuple[list[StandIn], list[str]]]:
    """Two stand-in servers on loopback, each in its own thread."""
    servers, urls, running = [StandIn(), StandIn()], [], []
    for stand_in in servers:
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(stand_in.app(), host="127.0.0.1", port=port, log_level="error"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        running.append((server, thread))
        urls.append(f"http://127.0.0.1:{port}")
    deadline = time.monotonic() + 60
    while not all(server.started for server, _ in running) and time.monotonic() < deadline:
        time.sleep(0.05)
    yield servers, urls
    for server, thread in running:
        server.should_exit = True
        thread.join(timeout=10)


def engine_for(urls: list[str]) -> RemoteEngine:
    settings = Settings.model_validate({
        "model": {"path": "stand-in", "max_model_len": 512},
        "engine": {"backend": "remote", "base_via_null_adapter": "off",
                   "servers": [{"url": url, "name": f"s{i}"} for i, url in enumerate(urls)]}})
    engine = RemoteEngine(settings)
    for i, state in enumerate(engine.states.values()):
        state.up = state.ready = True
        state.in_flight = i  # s0 is chosen first
    return engine


def run_then_close(engine: RemoteEngine, work: Coroutine[Any, Any, T]) -> T:
    """Run `work`, then close the engine's connections in the same loop."""
    async def both() -> T:
        try:
            return await work
        finally:
            await engine.shutdown()

    return asyncio.run(both())


def params(stream: bool = True) -> SamplingParams:
    kind = RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY
    return SamplingParams(max_tokens=200, temperature=0, output_kind=kind)


def test_a_server_that_fails_before_any_output_is_replaced_without_duplicate_text(stand_ins) -> None:
    servers, urls = stand_ins
    servers[0].mode = "refuse"
    servers[1].chunks = 5
    engine = engine_for(urls)

    async def run() -> str:
        return "".join([c.text async for out in engine.generate([1, 2], params(), "r1", None) for c in out.outputs])

    assert run_then_close(engine, run()) == "t0 t1 t2 t3 t4 "
    assert not engine.states["s0"].routable(time.monotonic()) and engine.states["s1"].requests == 1


def test_a_server_that_lost_the_adapter_is_reconciled_and_the_request_goes_elsewhere(stand_ins) -> None:
    servers, urls = stand_ins
    servers[0].mode = "unknown"  # restarted between two health checks: it lost its adapters
    servers[1].chunks = 2
    engine = engine_for(urls)

    async def run() -> str:
        return "".join([c.text async for out in engine.generate([1], params(), "r5", None) for c in out.outputs])

    assert run_then_close(engine, run()) == "t0 t1 "
    assert engine.states["s0"].ready is False  # no traffic until a reconcile pass


def test_a_stream_that_breaks_after_output_ends_with_a_clear_error(stand_ins) -> None:
    servers, urls = stand_ins
    servers[0].mode = "break"
    engine = engine_for(urls)
    seen: list[str] = []

    async def run() -> None:
        async for out in engine.generate([1, 2], params(), "r2", None):
            seen.extend(c.text for c in out.outputs)

    with pytest.raises(EngineUnavailable, match="stopped mid-answer"):
        run_then_close(engine, run())
    assert seen == ["t0 ", "t1 ", "t2 "]  # what was sent stays sent; nothing is repeated from s1
    assert servers[1].sent == 0


def test_output_without_text_is_held_so_a_failure_after_it_still_moves_on(stand_ins) -> None:
    """Tokens that decode to nothing (yet) have not reached the client: a break after them is
    retried elsewhere, and their token ids are not counted twice."""
    servers, urls = stand_ins
    servers[0].mode = "textless"
    servers[1].chunks = 3
    engine = engine_for(urls)

    async def run() -> list[tuple[str, list[int]]]:
        return [(c.text, c.token_ids) async for out in engine.generate([1], params(), "r6", None) for c in out.outputs]

    assert run_then_close(engine, run()) == [("t0 ", [0]), ("t1 ", [1]), ("t2 ", [2])]
    assert servers[0].sent == 3 and servers[1].sent == 3


def test_a_whole_answer_is_retried_even_after_a_break(stand_ins) -> None:
    servers, urls = stand_ins
    servers[0].mode = "break"
    servers[1].chunks = 4
    engine = engine_for(urls)

    async def run() -> list[str]:
        return [c.text async for out in engine.generate([1], params(stream=False), "r3", None) for c in out.outputs]

    assert run_then_close(engine, run()) == ["t0 t1 t2 t3 "]  # nothing had reached the client: s1 answers it all


def test_closing_the_stream_closes_the_upstream_request(stand_ins) -> None:
    servers, urls = stand_ins
    engine = engine_for(urls[:1])

    async def run() -> None:
        stream = engine.generate([1], params(), "r4", None)
        await anext(stream)
        await anext(stream)
        await stream.aclose()  # the client went away

    run_then_close(engine, run())
    assert servers[0].closed_early.wait(10)
    assert servers[0].sent < servers[0].chunks
    assert engine.states["s0"].in_flight == 0
