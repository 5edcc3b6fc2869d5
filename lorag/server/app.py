"""The FastAPI application: routers, error shape, request ids, health and readiness."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import structlog
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse

from lorag import __version__
from lorag.adapters.service import AdapterService
from lorag.config import Settings
from lorag.finetune.service import FineTuningService
from lorag.finetune.stores import open_file_store
from lorag.fleet.control import FleetControl
from lorag.improve.promotion import Promoter
from lorag.logging import get_logger
from lorag.loop.completions import CompletionStore
from lorag.loop.database_pg import open_loop_database
from lorag.loop.feedback import FeedbackStore
from lorag.server import (
    admin_api,
    completions_api,
    data_api,
    files_api,
    fine_tuning_api,
    knowledge_api,
    limits,
    metrics,
    openai_api,
)
from lorag.server.errors import error_body, error_response, install_error_handlers
from lorag.server.recorder import CompletionRecorder
from lorag.serving.build import ServingEngine, build_engine, build_pipeline
from lorag.serving.pipeline import Pipeline
from lorag.serving.warmup import start_warmup

log = get_logger("lorag.server")


class RequestContext:
    """Pure ASGI middleware: request id, body size limit, one log event per request.

    Pure ASGI rather than BaseHTTPMiddleware: it must not buffer or slow down streams. The body
    limit holds without a Content-Length too (a chunked upload): bytes are counted as the app
    reads them, and past the limit the client gets its 413 at once, nothing more is read, and
    the app sees the client gone.
    """

    def __init__(self, app: Any, max_body: int, max_upload: int) -> None:
        self.app = app
        self.max_body = max_body
        self.max_upload = max_upload  # multipart uploads (knowledge ingestion, /v1/files) have their own ceiling

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        request_id = (headers.get(b"x-request-id") or b"").decode(errors="replace")[:64] or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        scope["state"]["started"] = time.perf_counter()  # request latency (lorag.server.metrics)
        length = headers.get(b"content-length")
        upload = headers.get(b"content-type", b"").startswith(b"multipart/form-data")
        limit = self.max_upload if upload else self.max_body
        too_large = error_response(413, f"Request body is larger than {limit} bytes.",
                                   "invalid_request_error", code="request_too_large")
        if length is not None and length.isdigit() and int(length) > limit:
            await too_large(scope, receive, send)
            return
        status = {"code": 0}
        body = {"read": 0, "refused": False}

        async def send_wrapper(message: dict) -> None:
            if body["refused"]:
                return  # the 413 went out in the app's place
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        async def counted_receive() -> dict:
            if body["refused"]:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                body["read"] += len(message.get("body", b""))
                if body["read"] > limit:
                    body["refused"] = True
                    if not status["code"]:
                        status["code"] = 413
                        await too_large(scope, receive, send)
                    return {"type": "http.disconnect"}  # the app stops reading; the rest is never read
            return message

        structlog.contextvars.bind_contextvars(request_id=request_id)
        started = time.perf_counter()
        try:
            await self.app(scope, counted_receive, send_wrapper)
        finally:
            log.info("http_request", method=scope.get("method"), path=scope.get("path"), status=status["code"],
                     duration_ms=round((time.perf_counter() - started) * 1000, 2))
            structlog.contextvars.unbind_contextvars("request_id")


def create_app(settings: Settings, engine: ServingEngine | None = None) -> FastAPI:
    """Build the app; the engine starts in the lifespan unless one is passed in already started."""
    engine = engine or build_engine(settings)
    pipeline = build_pipeline(settings, engine)
    adapters = AdapterService(settings, pipeline.registry, engine)
    if isinstance(engine, FleetControl):
        engine.registry = pipeline.registry  # the fleet's leader repairs servers from the shared registry
    files = open_file_store(settings)  # the state directory's, or shared by every replica
    fine_tuning = FineTuningService(settings, files, adapters, engine)
    fine_tuning.promoter = Promoter(pipeline, adapters)
    loop_db = open_loop_database(settings)  # SQLite in the state directory, or [state] backend's PostgreSQL
    completions = CompletionStore(loop_db)
    recorder = CompletionRecorder(settings, completions)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.ready = False
        app.state.waiting = {"engine", "warmup"}
        # Started before the engine (whose start blocks this loop): the two overlap.
        stop_warmup = start_warmup_thread(app)
        try:
            if not engine.started:
                await engine.start()
            await preload_adapters(settings, adapters)
            await asyncio.to_thread(adapters.sweep)  # files of versions removed by a replica that stopped
            await fine_tuning.runner.start()  # after the engine: a job trained before a restart is registered now
        except BaseException:
            stop_warmup.set()
            raise
        mark_started(app, "engine")
        watchdog = asyncio.create_task(watch_engine(app, engine))
        try:
            yield
        finally:
            stop_warmup.set()
            watchdog.cancel()
            await fine_tuning.runner.stop()  # workers checkpoint; their jobs resume at the next start
            app.state.waiting.add("engine")  # a warm-up finishing now must not make us ready again
            app.state.ready = False
            pipeline.knowledge.close()
            await engine.shutdown()
            recorder.close()  # the queued writes first
            loop_db.close()
            await app.state.limiter.close()
            pipeline.registry.document.close()
            keyring = getattr(app.state, "keyring", None)  # made on the first request
            if keyring is not None:
                keyring.close()
            log.info("server_stopped")

    app = FastAPI(title="lorag", version=__version__, lifespan=lifespan)
    app.state.settings = settings
    app.state.pipeline = pipeline
    app.state.plugins = pipeline.plugins
    app.state.knowledge = pipeline.knowledge
    app.state.adapters = adapters
    app.state.files = files
    app.state.fine_tuning = fine_tuning
    app.state.recorder = recorder
    app.state.feedback = FeedbackStore(loop_db, completions)
    app.state.ready = False
    app.state.waiting = {"engine", "warmup"}  # what /ready waits for; the lifespan and warm-up clear it
    install_error_handlers(app)
    metrics.install(app)
    limits.install(app)
    app.include_router(openai_api.router, dependencies=[Depends(limits.admission)])
    app.include_router(admin_api.router)
    app.include_router(knowledge_api.router)
    app.include_router(files_api.router)
    app.include_router(fine_tuning_api.router)
    app.include_router(completions_api.router)
    app.include_router(data_api.router)

    @app.get("/health")
    async def health() -> JSONResponse:
        """Liveness: the process answers and the engine has not died."""
        if engine.started and not engine.alive:
            return error_response(503, "The engine has stopped.", "server_error", code="engine_dead")
        return JSONResponse({"status": "ok", "version": __version__})

    @app.get("/ready")
    async def ready(request: Request) -> JSONResponse:
        """Readiness: the engine is up, healthy, the registered adapters are loaded and the warm-up is done.

        While not ready, `waiting_for` says what is still starting ("engine", "warmup").
        """
        if not app.state.ready:
            waiting = sorted(app.state.waiting) or ["engine"]
            body = error_body(f"Not ready: waiting for {' and '.join(waiting)}.", "server_error", None, "not_ready")
            return JSONResponse({**body, "waiting_for": waiting}, status_code=503)
        try:
            await asyncio.wait_for(engine.check_health(), timeout=5)
        except Exception as err:
            return error_response(503, f"Not ready: {err}", "server_error", code="engine_unhealthy")
        answer: dict[str, Any] = {"status": "ready", "model": settings.model.served_name}
        servers = admin_api.fleet_status(request)
        if servers is not None:  # ready while one server is; the rest is reported, not hidden
            answer["servers"] = {s["name"]: {"up": s["up"] and s["ready"], "refused": s["refused"]} for s in servers}
        return JSONResponse(answer)

    # Multipart bodies: a knowledge upload or a fine-tuning file, each with a MiB for the form around it.
    max_upload = max(settings.knowledge.ingest.max_upload_bytes, settings.fine_tuning.max_file_bytes) + (1 << 20)
    app.add_middleware(RequestContext, max_body=settings.server.max_request_bytes,
                       max_upload=max(max_upload, settings.server.max_request_bytes))
    if settings.server.cors_origins:  # browsers on these origins may call the API (keys are still required)
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=settings.server.cors_origins, allow_methods=["*"],
                           allow_headers=["*"], expose_headers=["x-request-id", "retry-after"])
    return app


async def watch_engine(app: FastAPI, engine: ServingEngine, interval_s: float = 1.0) -> None:
    """When the engine dies: stop being ready, and shut down with exit code 1 so a supervisor restarts us."""
    while engine.alive:
        await asyncio.sleep(interval_s)
    app.state.ready = False
    app.state.waiting.add("engine")
    app.state.exit_code = 1
    log.error("engine_dead", action="shutting down; exit code 1")
    os.kill(os.getpid(), signal.SIGTERM)  # uvicorn's handler: drain and stop


def start_warmup_thread(app: FastAPI) -> threading.Event:
    """Warm the embedding model, knowledge bases and routing vectors in a thread; returns its stop flag.

    When it is done (failed parts are logged, not fatal) the loop marks "warmup" started.
    """
    loop = asyncio.get_running_loop()
    pipeline: Pipeline = app.state.pipeline

    def done() -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed first (shut down during warm-up)
            loop.call_soon_threadsafe(mark_started, app, "warmup")

    return start_warmup(pipeline.knowledge, pipeline.domains, pipeline.router, done)


def mark_started(app: FastAPI, part: str) -> None:
    """One start-up part is done; when none is left, the server is ready (on the loop's thread)."""
    app.state.waiting.discard(part)
    if app.state.waiting or app.state.ready:
        return
    app.state.ready = True
    log.info("server_ready", model=app.state.settings.model.served_name,
             adapters=[e.ref for e in app.state.adapters.registry.current()])


async def preload_adapters(settings: Settings, adapters: AdapterService) -> None:
    """Load what the registry already holds (a restart), then the adapters named in config or flags."""
    for entry in adapters.registry.current():
        await adapters.engine.load_adapter(entry)  # type: ignore[union-attr]
    for name, spec in settings.adapters.preload.items():
        if _already_registered(adapters, name, spec.version, spec.path):
            continue
        # With adapters.allowed_roots set, configured paths are held to them like API paths.
        await adapters.add(name, Path(spec.path), version=spec.version,
                           trusted=not settings.adapters.allowed_roots)


def _already_registered(adapters: AdapterService, name: str, version: str | None, path: str) -> bool:
    """Same name, same source (and version, when given): a restart, nothing to do."""
    source = str(Path(path).expanduser().resolve())
    for entry in adapters.registry.all_versions():
        if entry.name == name and entry.source == source and version in (None, entry.version):
            return True
    return False
