"""Start-up warm-up: load, before /ready, what the first request would otherwise load lazily.

The embedding model (seconds to load), each domain's knowledge bases (their Chroma
collections and BM25 indexes) and the routing vectors (domain profiles, few-shot
example vectors) are loaded by the same loaders the request path uses, in a thread
that overlaps the engine's start. A part that fails is logged and skipped: it loads
(or fails) lazily on first use as before, and retrieval follows the domain's on_error.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lorag.logging import get_logger

if TYPE_CHECKING:
    from lorag.knowledge.link import KnowledgeLink
    from lorag.serving.domains import DomainCatalog
    from lorag.serving.routing import Router

log = get_logger("lorag.warmup")
PROBE = "warm-up"  # the text encoded and searched once, so kernels and indexes are loaded


@dataclass
class WarmupReport:
    """What was warmed, how long each part took, and which parts failed (part -> error)."""

    durations_ms: dict[str, float] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)


def warm_up(knowledge: KnowledgeLink, catalog: DomainCatalog, router: Router,
            stop: threading.Event | None = None) -> WarmupReport:
    """Warm every part the configured domains use; never raises (failures are logged)."""
    report = WarmupReport()
    started = time.perf_counter()
    domains = list(catalog)
    if domains:
        with _part(report, "embeddings"):
            catalog.embedder().encode_query(PROBE)
        with _part(report, "routing", domains=len(domains)):
            router.warm()
        for kb in knowledge_bases(catalog):
            if stop is not None and stop.is_set():
                break
            with _part(report, "knowledge", kb=kb):
                knowledge.get().warm(kb)
    total = round((time.perf_counter() - started) * 1000, 2)
    report.durations_ms["total"] = total
    log.info("warmup", part="total", duration_ms=total, ok=not report.failed, failed=sorted(report.failed),
             domains=len(domains))
    return report


def knowledge_bases(catalog: DomainCatalog) -> list[str]:
    """Every knowledge base a configured domain names, once, in configuration order."""
    return list(dict.fromkeys(kb for domain in catalog for kb in domain.knowledge_bases))


@contextmanager
def _part(report: WarmupReport, part: str, **fields: Any) -> Iterator[None]:
    """One `warmup` event for a part, with its duration; an exception is logged, not raised."""
    name = f"{part}:{fields['kb']}" if "kb" in fields else part
    started = time.perf_counter()
    error: str | None = None
    try:
        yield
    except Exception as err:
        error = str(err) or type(err).__name__
        report.failed[name] = error
    duration = round((time.perf_counter() - started) * 1000, 2)
    report.durations_ms[name] = duration
    if error is None:
        log.info("warmup", part=part, duration_ms=duration, ok=True, **fields)
    else:
        log.warning("warmup", part=part, duration_ms=duration, ok=False, error=error, **fields)


def start_warmup(knowledge: KnowledgeLink, catalog: DomainCatalog, router: Router,
                 on_done: Callable[[], None]) -> threading.Event:
    """Run warm_up in a daemon thread (it overlaps the engine's start); returns its stop flag.

    A daemon thread rather than the loop's executor: a warm-up stuck on an unreachable
    Chroma server must not hold the process at exit. `on_done` runs in that thread.
    """
    stop = threading.Event()

    def run() -> None:
        try:
            warm_up(knowledge, catalog, router, stop)
        finally:
            on_done()

    threading.Thread(target=run, name="lorag-warmup", daemon=True).start()
    return stop
