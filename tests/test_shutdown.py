"""SIGTERM drains: in-flight streams finish normally, new connections are refused, exit code 0."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import httpx

from tests.conftest import USER_KEY, Models, start_server
from tests.devserver import wait_for

STREAMS = 4
MAX_TOKENS = 480  # a few seconds of generation for four streams on the tiny CPU model


def refuses_connections(url: str) -> bool:
    try:
        httpx.get(url, timeout=5)
    except httpx.ConnectError:
        return True
    return False


def test_sigterm_drains_in_flight_streams_then_exits_zero(models: Models, tmp_path: Path) -> None:
    server = start_server(models, tmp_path, preload=False)
    body = {"model": "tiny-base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": MAX_TOKENS,
            "ignore_eos": True, "stream": True}
    started = threading.Barrier(STREAMS + 1)
    events: list[list[str]] = [[] for _ in range(STREAMS)]
    done_at: list[float] = []

    def stream(index: int) -> None:
        with httpx.stream("POST", f"{server.api}/chat/completions", json=body,
                          headers={"authorization": f"Bearer {USER_KEY}"}, timeout=120) as response:
            lines = (line for line in response.iter_lines() if line.startswith("data: "))
            events[index].append(next(lines))
            started.wait(timeout=60)
            events[index].extend(lines)
        done_at.append(time.monotonic())

    readers = [threading.Thread(target=stream, args=(i,)) for i in range(STREAMS)]
    try:
        for reader in readers:
            reader.start()
        started.wait(timeout=120)  # every stream has its first event: all are in flight
        server.process.send_signal(signal.SIGTERM)
        # uvicorn closes its listener within a tick (0.1 s) of the signal when quiet, later when busy
        wait_for(lambda: refuses_connections(f"{server.url}/health"), 120, "connections to be refused", poll_s=0.1)
        refused_at = time.monotonic()
        for reader in readers:
            reader.join(timeout=120)
        assert server.process.wait(timeout=90) == 0
    finally:
        server.stop()
    assert len(done_at) == STREAMS and min(done_at) > refused_at, "streams should still run while refusing"
    for lines in events:
        assert lines[-1] == "data: [DONE]", lines[-3:]
        assert not any('"error"' in line for line in lines), [line for line in lines if '"error"' in line]
        finishes = [line for line in lines if '"finish_reason":"length"' in line]
        assert len(finishes) == 1, lines[-4:]
    log = server.log_path.read_text()
    assert '"server_stopped"' in log
