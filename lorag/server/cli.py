"""`lorag serve`: the OpenAI-compatible server, in the foreground."""

from __future__ import annotations

import ipaddress
import signal
import sys
from typing import Any

import click

from lorag.cli_options import common_options, settings_from_flags


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@click.command()
@common_options
@click.option("--host", help="Bind address (default 127.0.0.1).")
@click.option("--port", type=int, help="Port (default 8000).")
@click.option("--api-key", "api_keys", multiple=True, help="Admin API key clients must send (repeatable).")
@click.option("--workers", type=click.IntRange(1, 64),
              help="Processes serving the port (default 1; above 1 with the remote backend only).")
def serve(**flags: Any) -> None:
    """Serve the base model and its adapters on an OpenAI-compatible API."""
    import uvicorn

    from lorag.models.check import check_model
    from lorag.server.app import create_app
    from lorag.server.key_stores import key_store
    from lorag.server.listen import bind_listener

    settings = settings_from_flags(**flags)
    check_model(settings.model)  # before uvicorn: a bad model is one line, not a failed start-up
    host = settings.server.host
    store = key_store(settings)
    try:
        has_keys = bool(settings.server.api_keys) or store.has_keys()
    finally:
        store.close()  # the server's keyring opens its own
    if not has_keys:
        click.echo(f"No API keys configured: the API is open, so it listens on loopback only"
                   f"{'' if is_loopback(host) else f' (127.0.0.1, not {host})'}. Create one with `lorag keys create` "
                   "(or set server.api_keys) to require keys and listen on other addresses.", err=True)
        host = host if is_loopback(host) else "127.0.0.1"
    listener = bind_listener(host, settings.server.port)  # the port is ours before the engine's long start
    if settings.server.workers > 1:
        from lorag.server.workers import serve_workers

        click.echo(f"lorag serving {settings.model.served_name} on http://{host}:{settings.server.port}/v1 "
                   f"with {settings.server.workers} workers", err=True)
        serve_workers(settings, listener, has_keys)
        return
    app = create_app(settings)
    app.state.keys_required = has_keys  # keys at start: never fall back to open access (e.g. all revoked)
    click.echo(f"lorag serving {settings.model.served_name} on http://{host}:{settings.server.port}/v1", err=True)
    # uvicorn drains on SIGTERM/SIGINT, then re-raises the signal; with these no-op handlers
    # in place that re-raise is harmless and a clean shutdown exits 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    config = uvicorn.Config(app, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=settings.server.drain_timeout_s)
    uvicorn.Server(config).run(sockets=[listener])
    sys.exit(getattr(app.state, "exit_code", 0))
