"""`lorag chat`: ask a running server (streamed), or the pipeline in this process."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from typing import Any, Protocol

import click

from lorag.cli_options import API_KEY_ENV, SERVER_ENV, config_options, settings_from_flags
from lorag.errors import LoragError


@click.command()
@click.argument("prompt", required=False)
@click.option("--model", "-m", "model_name", help="Model to ask: an adapter name, name@version, or the base model.")
@click.option("--system", "-s", help="System prompt.")
@click.option("--server", envvar=SERVER_ENV, help=f"A running lorag server's URL (or ${SERVER_ENV}); without it, in-process.")
@click.option("--api-key", envvar=API_KEY_ENV, help=f"API key for --server (or ${API_KEY_ENV}).")
@click.option("--max-tokens", type=int, default=256, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True)
@config_options
@click.option("--engine-model", "engine_model", help="Base model path, for in-process chat.")
def chat(prompt: str | None, model_name: str | None, system: str | None, server: str | None,
         api_key: str | None, max_tokens: int, temperature: float, engine_model: str | None) -> None:
    """Chat with a model: one PROMPT, or an interactive loop when PROMPT is omitted."""
    if server:
        backend: ChatBackend = HttpChat(server, api_key)
    else:
        settings = settings_from_flags(model=engine_model)
        from lorag.serving.local import LocalPipeline

        backend = LocalPipeline(settings)
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


class ChatBackend(Protocol):
    """Where the answers come from: a server (HttpChat) or this process (lorag.serving.local)."""

    def default_model(self) -> str: ...

    def stream(self, model: str, messages: list[dict[str, str]], params: dict[str, Any]) -> Iterator[str]: ...

    def close(self) -> None: ...


class HttpChat:
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
