"""`lorag serve --workers N`: N processes serving one port, for the remote backend.

One lorag process spends about as much CPU per streamed token as vLLM's own API process, so
one core caps what a fleet can stream. Workers split that: the parent binds the port, then
uvicorn's supervisor starts N processes that accept on the same socket (the kernel spreads
connections) and restarts one that dies. Each worker builds the whole app from the settings
the parent resolved; what they must agree on is shared the way replicas share it:

- adapter registry and keys: the state directory (or PostgreSQL), re-read when changed;
- limits: Redis, or each worker counts 1/N of every limit in memory;
- the fleet's repairs and the fine-tuning queue: one leader each (lorag.state.leader).
"""

from __future__ import annotations

import functools
import socket
from typing import Any

from lorag.config import Settings


def worker_app(settings: Settings, keys_required: bool) -> Any:
    """The app of one worker (uvicorn calls it in the new process)."""
    from lorag.logging import configure_logging
    from lorag.server.app import create_app

    configure_logging()
    app = create_app(settings)
    app.state.keys_required = keys_required
    return app


def serve_workers(settings: Settings, listener: socket.socket, keys_required: bool) -> None:
    """Supervise `settings.server.workers` processes on `listener` until SIGTERM or SIGINT, which
    each worker answers by draining its requests (`server.drain_timeout_s`)."""
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    config = uvicorn.Config(functools.partial(worker_app, settings, keys_required), factory=True,
                            workers=settings.server.workers, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=settings.server.drain_timeout_s)
    Multiprocess(config, sockets=[listener]).run()
