"""`lorag serve` and `lorag chat`."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Any

import click

from lorag.config import AdapterSettings, ApiKey, Settings, load_settings
from lorag.errors import LoragError
from lorag.logging import get_logger

log = get_logger("lorag.cli")
SERVER_ENV = "LORAG_SERVER"
API_KEY_ENV = "LORAG_API_KEY"


def parse_adapter_flag(value: str) -> tuple[str, str]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise click.BadParameter(f"expected NAME=PATH, got {value!r}", param_hint="--adapter")
    return name, path


def settings_from_flags(config: str | None, state_dir: str | None, **flags: Any) -> Settings:
    """The config file (or defaults), then flags on top."""
    overrides = {
        "state_dir": state_dir,
        "model.path": flags.get("model"),
        "model.dtype": flags.get("dtype"),
        "model.max_model_len": flags.get("max_model_len"),
        "engine.max_loras": flags.get("max_loras"),
        "engine.max_lora_rank": flags.get("max_lora_rank"),
        "server.host": flags.get("host"),
        "server.port": flags.get("port"),
    }
    settings = load_settings(config, overrides)
    for key in flags.get("api_keys") or ():
        settings.server.api_keys.append(ApiKey(key=key, name="cli", admin=True))
    for value in flags.get("adapters") or ():
        name, path = parse_adapter_flag(value)
        settings.adapters.preload[name] = AdapterSettings(path=path)
    if not settings.model.path:
        raise LoragError("No model to serve: pass --model PATH (or set model.path in lorag.toml).")
    return settings


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def common_options(func: Any) -> Any:
    for option in reversed([
        click.option("--config", "-c", type=click.Path(dir_okay=False), help="lorag.toml (default: $LORAG_CONFIG or ./lorag.toml)."),
        click.option("--state-dir", help="Where lorag keeps adapters, knowledge and caches (default .lorag)."),
        click.option("--model", help="Imported model name (lorag models list), local HF checkpoint folder or HF model id."),
        click.option("--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"])),
        click.option("--max-model-len", type=int),
        click.option("--max-loras", type=int, help="Distinct adapters in one batch."),
        click.option("--max-lora-rank", type=int),
        click.option("--adapter", "adapters", multiple=True, metavar="NAME=PATH", help="Serve this adapter (repeatable)."),
    ]):
        func = option(func)
    return func


@click.command()
@common_options
@click.option("--host", help="Bind address (default 127.0.0.1).")
@click.option("--port", type=int, help="Port (default 8000).")
@click.option("--api-key", "api_keys", multiple=True, help="Admin API key clients must send (repeatable).")
def serve(config: str | None, state_dir: str | None, **flags: Any) -> None:
    """Serve the base model and its adapters on an OpenAI-compatible API."""
    import uvicorn

    from lorag.models.check import check_model
    from lorag.runtime.keys import KeyStore
    from lorag.runtime.server import create_app

    settings = settings_from_flags(config, state_dir, **flags)
    check_model(settings.model)  # before uvicorn: a bad model is one line, not a failed start-up
    host = settings.server.host
    has_keys = bool(settings.server.api_keys) or KeyStore(settings.state_path).has_keys()
    if not has_keys:
        click.echo(f"No API keys configured: the API is open, so it listens on loopback only"
                   f"{'' if is_loopback(host) else f' (127.0.0.1, not {host})'}. Create one with `lorag keys create` "
                   "(or set server.api_keys) to require keys and listen on other addresses.", err=True)
        host = host if is_loopback(host) else "127.0.0.1"
    app = create_app(settings)
    app.state.keys_required = has_keys  # keys at start: never fall back to open access (e.g. all revoked)
    click.echo(f"lorag serving {settings.model.served_name} on http://{host}:{settings.server.port}/v1", err=True)
    # uvicorn drains on SIGTERM/SIGINT, then re-raises the signal; with these no-op handlers
    # in place that re-raise is harmless and a clean shutdown exits 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    uvicorn.run(app, host=host, port=settings.server.port, log_level="warning", access_log=False,
                timeout_graceful_shutdown=settings.server.drain_timeout_s)
    sys.exit(getattr(app.state, "exit_code", 0))


# -- chat -------------------------------------------------------------------------


@click.command()
@click.argument("prompt", required=False)
@click.option("--model", "-m", "model_name", help="Model to ask: an adapter name, name@version, or the base model.")
@click.option("--system", "-s", help="System prompt.")
@click.option("--server", envvar=SERVER_ENV, help=f"A running lorag server's URL (or ${SERVER_ENV}); without it, in-process.")
@click.option("--api-key", envvar=API_KEY_ENV, help=f"API key for --server (or ${API_KEY_ENV}).")
@click.option("--max-tokens", type=int, default=256, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True)
@click.option("--config", "-c", type=click.Path(dir_okay=False), help="lorag.toml, for in-process chat.")
@click.option("--state-dir", help="State directory, for in-process chat.")
@click.option("--engine-model", "engine_model", help="Base model path, for in-process chat.")
def chat(prompt: str | None, model_name: str | None, system: str | None, server: str | None,
         api_key: str | None, max_tokens: int, temperature: float, config: str | None,
         state_dir: str | None, engine_model: str | None) -> None:
    """Chat with a model: one PROMPT, or an interactive loop when PROMPT is omitted."""
    if server:
        backend: ChatBackend = HttpChat(server, api_key)
    else:
        settings = settings_from_flags(config, state_dir, model=engine_model)
        backend = LocalChat(settings)
    model = model_name or backend.default_model()
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    params = {"max_tokens": max_tokens, "temperature": temperature}
    try:
        for question in _questions(prompt):
            history.append({"role": "user", "content": question})
            answer = ""
            for piece in backend.stream(model, history, params):
                answer += piece
                click.echo(piece, nl=False)
            click.echo()
            history.append({"role": "assistant", "content": answer})
    finally:
        backend.close()


def _questions(prompt: str | None) -> Iterator[str]:
    if prompt is not None:
        yield prompt
        return
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            click.echo("> ", nl=False)
        line = sys.stdin.readline()
        if not line or line.strip() in ("/exit", "/quit"):
            return
        if line.strip():
            yield line.strip()


class ChatBackend:
    def default_model(self) -> str:
        raise NotImplementedError

    def stream(self, model: str, messages: list[dict[str, str]], params: dict[str, Any]) -> Iterator[str]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class HttpChat(ChatBackend):
    """Talks to a running server over its OpenAI API (streamed)."""

    def __init__(self, url: str, api_key: str | None) -> None:
        import httpx

        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=300)

    def _check(self, response: Any) -> None:
        if response.status_code >= 400:
            response.read()
            try:
                message = response.json()["error"]["message"]
            except Exception:
                message = response.text[:200]
            raise LoragError(f"server answered {response.status_code}: {message}")

    def default_model(self) -> str:
        import httpx

        try:
            response = self.client.get("/v1/models")
        except httpx.HTTPError as err:
            raise LoragError(f"cannot reach the server at {self.client.base_url}: {err}") from None
        self._check(response)
        return str(response.json()["data"][0]["id"])

    def stream(self, model: str, messages: list[dict[str, str]], params: dict[str, Any]) -> Iterator[str]:
        body = {"model": model, "messages": messages, "stream": True, **params}
        with self.client.stream("POST", "/v1/chat/completions", json=body) as response:
            self._check(response)
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[6:])
                if "error" in data:
                    raise LoragError(data["error"]["message"])
                for choice in data.get("choices", []):
                    yield choice.get("delta", {}).get("content") or ""

    def close(self) -> None:
        self.client.close()


class LocalChat(ChatBackend):
    """Runs the engine in this process (no server needed)."""

    def __init__(self, settings: Settings) -> None:
        from lorag.adapters.registry import AdapterRegistry
        from lorag.logging import LOG_LEVEL_ENV, configure_logging
        from lorag.runtime.engine import Engine
        from lorag.runtime.pipeline import Runtime

        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # the terminal is for the answer
        configure_logging(level=os.environ.get(LOG_LEVEL_ENV, "warning"))
        self.loop = asyncio.new_event_loop()
        engine = Engine(settings)
        self.loop.run_until_complete(engine.start())
        from lorag.plugins.runtime import PluginHost

        self.runtime = Runtime(settings, engine, AdapterRegistry(settings.state_path),
                               PluginHost.from_settings(settings))

    def default_model(self) -> str:
        return self.runtime.base_model

    def stream(self, model: str, messages: list[dict[str, str]], params: dict[str, Any]) -> Iterator[str]:
        from lorag.runtime.pipeline import new_request_id
        from lorag.runtime.protocol import ChatCompletionRequest

        request = ChatCompletionRequest.model_validate({"model": model, "messages": messages, "stream": True, **params})
        job = self.loop.run_until_complete(self.runtime.prepare_chat(request, new_request_id("chat")))
        deltas: AsyncIterator[Any] = self.runtime.generate(job)
        while True:
            try:
                delta = self.loop.run_until_complete(deltas.__anext__())
            except StopAsyncIteration:
                return
            yield delta.text

    def close(self) -> None:
        self.runtime.engine.shutdown()
        pending = asyncio.all_tasks(self.loop)
        for task in pending:
            task.cancel()
        self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self.loop.close()
