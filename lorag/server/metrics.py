"""Prometheus `/metrics`: what the operators of a shared GPU server watch.

Requests, latency per pipeline stage and tokens, labelled by endpoint, domain,
adapter and status; adapters loaded; knowledge base sizes. One registry per app
(tests run several apps in one process). Labels stay bounded: the endpoint is the
route's template ('unmatched' for any other path), domain and adapter come from a
resolved job (never the raw `model` string, so unknown models add no series), and
no request id or key secret is ever a label. Gauges that read the engine, the
registry or the knowledge service are computed at scrape time, and the knowledge
service is only read when something already opened it (a scrape never opens Chroma).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from lorag import lanes
from lorag.errors import LoragError
from lorag.fleet.control import fleet_status
from lorag.logging import get_logger
from lorag.server.auth import Principal, require_admin

log = get_logger("lorag.metrics")
T = TypeVar("T")
router = APIRouter()
NONE = "none"  # label of a request that failed before it had a domain or adapter, and of the base model
UNMATCHED = "unmatched"  # endpoint label of paths no route serves (scanners must not add series)
CLIENT_CLOSED = "499"  # status of a stream the client left (nginx's convention)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class Metrics:
    """The app's collectors; `observe` records one request, `count_error` the ones that failed early."""

    def __init__(self, app: FastAPI) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        labels = ["endpoint", "domain", "adapter"]
        self.requests = Counter("lorag_requests", "Requests answered, by final HTTP status.",
                                [*labels, "status"], registry=self.registry)
        self.latency = Histogram("lorag_request_duration_seconds", "Request latency, first byte in to last byte out.",
                                 labels, buckets=LATENCY_BUCKETS, registry=self.registry)
        self.stages = Histogram("lorag_stage_duration_seconds", "Time spent in each pipeline stage (job.timings).",
                                [*labels, "stage"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.tokens = Counter("lorag_tokens", "Prompt and completion tokens.", [*labels, "kind"],
                              registry=self.registry)
        self.registry.register(StateCollector(app))
        self.gone: set[int] = set()  # lora_int_ids of removed versions (never reused): their series go

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def forget(self, adapter: Any) -> None:
        """A removed adapter version was released: drop its series now, and again after any of its
        requests that were still finishing records itself (Observation.finish)."""
        self.gone.add(adapter.lora_int_id)
        self.drop_adapter(adapter.ref)

    def drop_adapter(self, ref: str) -> None:
        for family in (self.requests, self.latency, self.stages, self.tokens):
            family.remove_by_labels({"adapter": ref})


def forget_adapter(request: Request) -> Callable[[Any], None]:
    """What to run once a removed adapter version is released (admin_api): drop its series, so the
    `adapter` label does not grow with every version that ever came and went."""
    return request.app.state.metrics.forget


def install(app: FastAPI) -> None:
    """Create the app's metrics and serve them on /metrics."""
    app.state.metrics = Metrics(app)
    app.include_router(router)


@router.get("/metrics", include_in_schema=False)
def metrics_endpoint(request: Request, _: Principal = Depends(require_admin)) -> Response:
    """Prometheus text format. An admin key (when keys are configured): names of adapters and
    knowledge bases are not for every tenant. A plain function: counting chunks calls Chroma."""
    metrics: Metrics = request.app.state.metrics
    return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)


# -- one request ------------------------------------------------------------------


class Observation:
    """One API request from the moment its job exists; recorded once, however it ends."""

    def __init__(self, metrics: Metrics, endpoint: str, job: Any, started: float) -> None:
        self.metrics = metrics
        self.job = job
        self.started = started
        target = job.target
        domain = target.plugin_scope  # the domain, else the model resolved
        self.labels = {"endpoint": endpoint, "domain": str(domain or NONE), "adapter": str(target.adapter_ref or NONE)}
        self.finished = False

    def done(self, choices: list[Any]) -> list[Any]:
        """A non-streamed answer that is about to be sent."""
        self.finish("200")
        return choices

    async def stream(self, chunks: AsyncIterator[T]) -> AsyncIterator[T]:
        """Pass chunks through; record when the stream ends, with the status its error carried."""
        status = "200"
        try:
            async for chunk in chunks:
                yield chunk
        except LoragError as err:
            status = str(err.status_code)
            raise
        except Exception:
            status = "500"
            raise
        except BaseException:  # cancelled or closed: the client went away
            status = CLIENT_CLOSED
            raise
        finally:
            self.finish(status)

    def finish(self, status: str) -> None:
        if self.finished:
            return
        self.finished = True
        self._record(status)
        adapter = self.job.target.adapter
        if adapter is not None and adapter.lora_int_id in self.metrics.gone:  # removed while this one finished
            self.metrics.drop_adapter(adapter.ref)

    def _record(self, status: str) -> None:
        """Tokens as `usage` counts them (the job's: every attempt and tool step)."""
        m, labels = self.metrics, self.labels
        m.requests.labels(**labels, status=status).inc()
        m.latency.labels(**labels).observe(time.perf_counter() - self.started)
        for stage, ms in list(self.job.timings.items()):
            if isinstance(ms, int | float):
                m.stages.labels(**labels, stage=stage.removesuffix("_ms")).observe(ms / 1000)
        if status != "200" and "generate_ms" not in self.job.timings:
            return  # refused before generation (a 429, a timeout in the queue): no tokens were processed
        m.tokens.labels(**labels, kind="prompt").inc(self.job.prompt_tokens)
        if self.job.completion_tokens:
            m.tokens.labels(**labels, kind="completion").inc(self.job.completion_tokens)


def observe(request: Request, job: Any) -> Observation:
    """Start recording `job`'s request; the error handlers finish it if it fails (see count_error)."""
    started = getattr(request.state, "started", None) or time.perf_counter()
    observation = Observation(request.app.state.metrics, endpoint_label(request), job, started)
    request.state.observation = observation
    return observation


def count_error(request: Request, status: int) -> None:
    """An error response: finish the request's observation, or count it without domain/adapter."""
    metrics: Metrics | None = getattr(request.app.state, "metrics", None)
    if metrics is None:
        return
    observation: Observation | None = getattr(request.state, "observation", None)
    if observation is not None:
        observation.finish(str(status))
        return
    metrics.requests.labels(endpoint=endpoint_label(request), domain=NONE, adapter=NONE,
                            status=str(status)).inc()


def endpoint_label(request: Request) -> str:
    route = request.scope.get("route")
    path = getattr(route, "path_format", None) or getattr(route, "path", None)
    return str(path) if path else UNMATCHED


# -- gauges read at scrape time ------------------------------------------------------


class StateCollector(Collector):
    """Readiness, adapters, in-flight requests and knowledge base sizes, read when scraped."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    def collect(self) -> Iterable[GaugeMetricFamily]:
        state = self.app.state
        yield _gauge("lorag_ready", "1 when the server is ready to answer.", float(bool(getattr(state, "ready", False))))
        pipeline = getattr(state, "pipeline", None)
        if pipeline is not None:
            yield _gauge("lorag_adapters_registered", "Adapters with a current version in the registry.",
                         len(pipeline.registry.current()))
            engine = pipeline.engine
            yield _gauge("lorag_adapters_loaded", "Adapter versions loaded in the engine.",
                         engine.loaded_adapters if engine.started else 0)
            servers = fleet_status(engine)
            if servers is not None:  # a fleet of vLLM servers (lorag.fleet)
                yield from fleet_metrics(servers)
        limiter = getattr(state, "limiter", None)
        if limiter is not None:
            in_flight = GaugeMetricFamily("lorag_requests_in_flight", "API requests in flight, per key.",
                                          labels=["key", "key_id"])
            for key, count in sorted(limiter.in_flight.copy().items()):  # copy: the event loop changes it
                in_flight.add_metric([limiter.names.get(key, key), key], count)
            yield in_flight
        busy = GaugeMetricFamily("lorag_threads_busy", "Calls running in each lane of threads (lorag.lanes), "
                                 "timed-out ones included until they return.", labels=["lane"])
        queued = GaugeMetricFamily("lorag_threads_queued", "Calls waiting for a place in each lane.",
                                   labels=["lane"])
        for lane in lanes.ALL:
            busy.add_metric([lane.name], lane.busy)
            queued.add_metric([lane.name], lane.queued)
        yield busy
        yield queued
        link = getattr(state, "knowledge", None)  # a scrape never opens the store
        yield from self._knowledge(link.opened() if link is not None else None)

    def _knowledge(self, service: Any) -> Iterable[GaugeMetricFamily]:
        if service is None or getattr(service, "closed", True):
            return  # not opened by anyone yet: do not open Chroma for a scrape
        chunks = GaugeMetricFamily("lorag_knowledge_chunks", "Chunks in each knowledge base.", labels=["kb"])
        documents = GaugeMetricFamily("lorag_knowledge_documents", "Documents in each knowledge base.",
                                      labels=["kb"])
        try:
            bases = service.list_bases()
        except Exception as err:  # a scrape must not fail because the store is away
            log.warning("metrics_knowledge_unavailable", error=str(err))
            return
        for base in bases:
            chunks.add_metric([base["name"]], base["chunks"])
            documents.add_metric([base["name"]], base["documents"])
        yield chunks
        yield documents


# (metric, help, status key, counter?) per server of a fleet.
_FLEET = (
    ("lorag_fleet_server_up", "1 when the vLLM server is up and reconciled.", "ready", False),
    ("lorag_fleet_requests_in_flight", "Requests in flight on the vLLM server.", "in_flight", False),
    ("lorag_fleet_adapters_loaded", "Adapters lorag has loaded on the vLLM server.", "adapters", False),
    ("lorag_fleet_adapter_load_failures", "Adapter loads the vLLM server refused.", "load_failures", True),
    ("lorag_fleet_reconcile_repairs", "Adapters loaded or unloaded by reconcile passes.", "repairs", True),
    ("lorag_fleet_requests", "Requests sent to the vLLM server.", "requests", True),
)


def fleet_metrics(servers: list[dict[str, Any]]) -> Iterable[Any]:
    """Per-server gauges and counters of a fleet, labelled by server name."""
    for name, documentation, key, counter in _FLEET:
        family: Any = (CounterMetricFamily(name, documentation, labels=["server"]) if counter
                       else GaugeMetricFamily(name, documentation, labels=["server"]))
        for server in servers:
            value = server[key]
            family.add_metric([server["name"]], float(len(value) if isinstance(value, list) else value))
        yield family


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)
