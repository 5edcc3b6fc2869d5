"""Where `lorag adapters` commands act: a running server's admin API, or the local registry."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import click

from lorag.cli_options import cli_settings, config_options
from lorag.config import Settings
from lorag.errors import LoragError


@dataclass
class AdapterOptions:
    """The `lorag adapters` group's own flags; the backend is built per command from them."""

    model: str | None = None
    server: str | None = None
    api_key: str | None = None
    offline: bool = False


class AdapterBackend:
    """Either a server's admin API or the local registry."""

    def __init__(self, settings: Settings, server: str | None, api_key: str | None, offline: bool) -> None:
        self.settings = settings
        self.client: Any = None
        url = None if offline else server or _answering_server(settings)
        if url:
            import httpx

            headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
            self.client = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=120)

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        import httpx

        try:
            response = self.client.request(method, path, **kwargs)
        except httpx.HTTPError as err:
            raise LoragError(f"cannot reach the server at {self.client.base_url}: {err}") from None
        if response.status_code >= 400:
            try:
                message = response.json()["error"]["message"]
            except Exception:
                message = response.text[:300]
            raise LoragError(message)
        return response.json()

    def service(self) -> Any:
        from lorag.adapters.registry_pg import open_registry
        from lorag.adapters.service import AdapterService

        return AdapterService(self.settings, open_registry(self.settings, listen=False))


def _answering_server(settings: Settings) -> str | None:
    import httpx

    host = settings.server.host if settings.server.host not in ("0.0.0.0", "::") else "127.0.0.1"
    url = f"http://{host}:{settings.server.port}"
    try:
        if httpx.get(f"{url}/health", timeout=1).status_code == 200:
            return url
    except httpx.HTTPError:
        pass
    return None


def pass_backend(func: Callable[..., Any]) -> Callable[..., Any]:
    """The command gets an AdapterBackend first: the one the caller passed in (`obj=`, the demo), or one
    built from the group's flags and the chosen config (-c/--state-dir on the group or the command)."""
    @functools.wraps(func)
    def with_backend(*args: Any, **kwargs: Any) -> Any:
        ctx = click.get_current_context()
        backend = ctx.find_object(AdapterBackend)
        if backend is None:
            options = ctx.find_object(AdapterOptions) or AdapterOptions()
            backend = AdapterBackend(cli_settings(**{"model.path": options.model}), options.server,
                                     options.api_key, options.offline)
        return func(backend, *args, **kwargs)

    return config_options(with_backend)
