"""structlog set-up: console lines on a TTY, JSON lines otherwise.

Request-scoped values (request id, model, adapter) are bound with
structlog.contextvars so every event of a request carries them.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import structlog

LOG_LEVEL_ENV = "LORAG_LOG_LEVEL"
LOG_FORMAT_ENV = "LORAG_LOG_FORMAT"  # "json" | "console"


QUIET_LIBRARIES = ("httpx", "chromadb", "urllib3")


def configure_logging(level: str | None = None, fmt: str | None = None) -> None:
    """Configure structlog once for the process; safe to call again."""
    level_name = (level or os.environ.get(LOG_LEVEL_ENV, "info")).upper()
    fmt = fmt or os.environ.get(LOG_FORMAT_ENV) or ("console" if sys.stderr.isatty() else "json")
    renderer: Any = (
        structlog.dev.ConsoleRenderer() if fmt == "console" else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level_name, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    # Libraries whose debug chatter reaches the terminal when another library sets up root logging.
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(logging.WARNING)


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)


@contextmanager
def stage(log: Any, name: str, level: str = "info", **fields: Any) -> Iterator[dict[str, Any]]:
    """Log one event for a stage with its duration in ms; callers may add fields. A request's
    stages log at debug (its one info line is the `generate` summary, with the same timings)."""
    extra: dict[str, Any] = {}
    start = time.perf_counter()
    try:
        yield extra
    finally:
        getattr(log, level)(name, duration_ms=round((time.perf_counter() - start) * 1000, 2), **fields, **extra)
