"""The real lorag app (create_app) over real HTTP, on the echo engine: the request path's inner loop.

Uvicorn serves `create_app(settings, engine=EchoEngine())` from a thread of the test process
on a port the OS picks, so the official `openai` client talks to lorag exactly as it would in
production: routes, auth, limits, SSE framing, error shapes and plugins are all the real ones;
only generation is the echo engine's (tests/echo_engine.py). It starts in well under a second.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from lorag.config import Settings
from tests.echo_engine import EchoEngine

ADMIN_KEY = "sk-admin-echo-key"
USER_KEY = "sk-user-echo-key"
TRAINER = "sk-trainer-echo-key"  # two keys with the fine_tune scope (files and fine-tuning jobs)
OTHER_TRAINER = "sk-other-trainer-echo-key"
START_TIMEOUT_S = 120  # generous: a loaded machine


@dataclass
class EchoServer:
    url: str
    app: Any
    engine: EchoEngine
    settings: Settings

    @property
    def api(self) -> str:
        return f"{self.url}/v1"

    @property
    def pipeline(self) -> Any:
        return self.app.state.pipeline

    def client(self, key: str = USER_KEY, **options: Any) -> Any:  # -> openai.OpenAI
        import openai

        return openai.OpenAI(base_url=self.api, api_key=key, max_retries=0, timeout=options.pop("timeout", 120),
                             **options)

    def admin(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"authorization": f"Bearer {ADMIN_KEY}"}, timeout=120)


def echo_settings(tmp_path: Path, **tables: Any) -> Settings:
    """Settings for an echo server: an admin and a user key unless `server` says otherwise."""
    server = {"api_keys": [{"key": ADMIN_KEY, "name": "ops", "admin": True}, {"key": USER_KEY, "name": "app"}],
              **tables.pop("server", {})}
    return Settings.model_validate({"state_dir": str(tmp_path / "state"), "model": {"path": "echo-base"},
                                    "server": server, **tables})


def trainer_keys() -> list[dict[str, Any]]:
    """An admin, a user, and two trainers: the keys the files and fine-tuning tests tell apart."""
    return [{"key": ADMIN_KEY, "name": "ops", "admin": True}, {"key": USER_KEY, "name": "app"},
            {"key": TRAINER, "name": "trainer", "fine_tune": True},
            {"key": OTHER_TRAINER, "name": "other-trainer", "fine_tune": True}]


@contextlib.contextmanager
def echo_server(settings: Settings, engine: EchoEngine | None = None) -> Iterator[EchoServer]:
    """`create_app` on the echo engine, served by uvicorn on 127.0.0.1 (a free port) until the block ends."""
    import uvicorn

    from lorag.server.app import create_app

    engine = engine or EchoEngine()
    app = create_app(settings, engine=engine)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="echo-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + START_TIMEOUT_S
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the echo server did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield EchoServer(f"http://127.0.0.1:{port}", app, engine, settings)
    finally:
        # The warm-up thread (it loads the embedding model when there are domains) must be done
        # before the test process can exit: torch in a daemon thread at exit aborts the process.
        while "warmup" in app.state.waiting and thread.is_alive() and time.monotonic() < deadline + START_TIMEOUT_S:
            time.sleep(0.05)
        server.should_exit = True
        thread.join(START_TIMEOUT_S)
