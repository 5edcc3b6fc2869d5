"""The HTTP client that `lorag ft`, `lorag completions` and `lorag data` share: how they find and
authenticate to a server (--server, $LORAG_SERVER, or the configured host:port if it answers;
--api-key or $LORAG_API_KEY), and how its answers and errors become one readable line.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast
from urllib.parse import quote

import click

from lorag.adapters.cli_backend import AdapterBackend
from lorag.cli_options import API_KEY_ENV, SERVER_ENV, cli_settings, config_options
from lorag.errors import LoragError

PAGE = 100  # the server's largest page of jobs, events, checkpoints and completions
SERVER_KEY = "lorag.ft.server"
API_KEY_KEY = "lorag.ft.api_key"


class Unreachable(LoragError):
    """The server did not answer at all (as opposed to answering with an error)."""


class FineTuningApi:
    """The server's Files and Fine-tuning routes, through `lorag adapters`' client (auth, error bodies)."""

    def __init__(self, backend: AdapterBackend) -> None:
        self.backend = backend

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        """The JSON answer; any failure is one readable line (Unreachable when nothing answered)."""
        import httpx

        if self.backend.client is None:  # said at the first call, after the command's own usage errors
            server = self.backend.settings.server
            raise LoragError(f"No lorag server answers at {server.host}:{server.port} (the configured address): "
                             f"start `lorag serve`, or pass --server URL (or set {SERVER_ENV}).")

        try:
            return self.backend.call(method, path, **kwargs)
        except LoragError as err:
            # AdapterBackend raises `from None`; the transport error is still its context.
            kind = Unreachable if isinstance(err.__context__, httpx.TransportError) else LoragError
            raise kind(one_line(err.message)) from None
        except ValueError:  # a 2xx that is not JSON: something else listens there
            raise LoragError(f"The server at {self.backend.client.base_url} did not answer as lorag does: "
                             "is --server right?") from None

    def upload(self, path: Path) -> dict[str, Any]:
        """Multipart, `purpose` first (as the openai SDK sends it), the file streamed from disk."""
        with path.open("rb") as handle:
            return cast(dict[str, Any], self.call("POST", "/v1/files", data={"purpose": "fine-tune"},
                                                  files={"file": (path.name, handle, "application/jsonl")}))

    def job(self, job_id: str, verb: str | None = None) -> dict[str, Any]:
        """The job (GET), or what a POST of `verb` (cancel, pause, resume) made of it."""
        path = job_path(job_id)
        return cast(dict[str, Any], self.call("POST", f"{path}/{verb}") if verb else self.call("GET", path))

    def pages(self, path: str, params: dict[str, str] | None = None, *, limit: int | None = None,
              after: str | None = None) -> Iterator[dict[str, Any]]:
        """Items of a cursor-paginated list in the server's order, page after page (at most `limit`)."""
        left = limit
        while left is None or left > 0:
            cursor = {"after": after} if after else {}
            page = self.call("GET", path, params={**(params or {}), **cursor, "limit": min(PAGE, left or PAGE)})
            yield from page["data"]
            left = None if left is None else left - len(page["data"])
            if not page["has_more"] or not page["data"]:
                return
            after = page["last_id"]

    def new_events(self, job_id: str, seen: set[str]) -> list[dict[str, Any]]:
        """Events not in `seen`, oldest first: pages are newest first, so read until a known one."""
        fresh = []
        for event in self.pages(f"{job_path(job_id)}/events"):
            if event["id"] in seen:
                break
            fresh.append(event)
        seen.update(event["id"] for event in fresh)
        return fresh[::-1]


def job_path(job_id: str) -> str:
    """The job's URL, its id quoted: a typo with a '/' must be an unknown job, not another route."""
    return f"/v1/fine_tuning/jobs/{quote(job_id, safe='')}"


def _remember(key: str) -> Callable[[click.Context, click.Parameter, Any], None]:
    """Keep a flag in ctx.meta, which the group's and the command's contexts share: the later one wins."""
    return lambda ctx, _param, value: None if value is None else ctx.meta.update({key: value})


FINE_TUNE_KEY = "API key with the fine_tune scope (or admin)"


def server_options(func: Any, *, envvar: bool = False, key_help: str = FINE_TUNE_KEY) -> Any:
    """--server and --api-key, on the group (reading the environment too) and on every command."""
    func = click.option("--api-key", envvar=API_KEY_ENV if envvar else None, expose_value=False,
                        callback=_remember(API_KEY_KEY), help=f"{key_help} (default: ${API_KEY_ENV}).")(func)
    return click.option("--server", envvar=SERVER_ENV if envvar else None, expose_value=False,
                        callback=_remember(SERVER_KEY),
                        help=f"The lorag server's URL (default: ${SERVER_ENV}, else the configured address "
                             "if a server answers there).")(func)


def passing_api(key_help: str = FINE_TUNE_KEY) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A decorator: the command gets a FineTuningApi first (one passed in with `obj=`, or one built from
    --server and --api-key, whose help says what key it needs)."""
    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(func)
        def with_api(*args: Any, **kwargs: Any) -> Any:
            ctx = click.get_current_context()
            api = ctx.find_object(FineTuningApi)
            if api is None:
                meta = ctx.meta
                api = FineTuningApi(AdapterBackend(cli_settings(), meta.get(SERVER_KEY), meta.get(API_KEY_KEY),
                                                   False))
            return func(api, *args, **kwargs)

        return server_options(config_options(with_api), key_help=key_help)

    return decorate


pass_api = passing_api()


def one_line(message: str) -> str:
    """A multi-line message (a data file's problems, one per line) joined into one line."""
    parts = [line.strip() for line in message.splitlines() if line.strip()]
    joined = parts[0] if parts else ""
    for part in parts[1:]:
        joined += (" " if joined.endswith(":") else "; ") + part
    return joined


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=True)]
    return "\n".join("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
                     for row in [headers, *rows])


def pairs(values: tuple[str, ...], flag: str) -> dict[str, str]:
    """KEY=VALUE flags as a dict; a value without '=' is a usage error naming the flag."""
    found = {}
    for value in values:
        key, sep, item = value.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {value!r}", param_hint=flag)
        found[key] = item
    return found
