"""The engine dying: in-flight requests end with 503-shaped errors, /ready fails, the process exits 1."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import httpx
import psutil

from tests.conftest import USER_KEY, Models, start_server


def engine_processes(pid: int) -> list[psutil.Process]:
    return list(psutil.Process(pid).children(recursive=True))


def test_engine_death_fails_requests_and_exits_non_zero(models: Models, tmp_path: Path) -> None:
    server = start_server(models, tmp_path, preload=False)
    headers = {"authorization": f"Bearer {USER_KEY}"}
    body = {"model": "tiny-base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 480,
            "ignore_eos": True, "stream": True}
    events: list[str] = []
    streaming = threading.Event()
    try:
        def stream() -> None:
            with httpx.stream("POST", f"{server.api}/chat/completions", json=body, headers=headers,
                              timeout=60) as response:
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        events.append(line)
                        streaming.set()

        reader = threading.Thread(target=stream)
        reader.start()
        # Kill once the answer is streaming (not after a fixed sleep: on a loaded machine the
        # request may not have reached the engine yet, or may be nearly done).
        assert streaming.wait(timeout=120), "the answer never started streaming"
        for child in engine_processes(server.process.pid):
            os.kill(child.pid, signal.SIGKILL)
        reader.join(timeout=60)
        assert events and events[-1] == "data: [DONE]", events[-3:]
        assert len(events) < 400, "the stream should have been cut short by the kill"
        assert '"error"' in events[-2] and "engine" in events[-2].lower()
        code = server.process.wait(timeout=90)
        assert code == 1
        assert '"engine_dead"' in server.log_path.read_text()
    finally:
        server.stop()
