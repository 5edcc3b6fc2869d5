"""`lorag adapters add|list|show|activate|remove`.

With a running server (--server, $LORAG_SERVER, or one answering at the
configured host:port) the commands go through its admin API so the change is
live; otherwise they edit the registry in the state directory.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import click

from lorag.config import Settings, load_settings
from lorag.errors import LoragError

SERVER_ENV = "LORAG_SERVER"
API_KEY_ENV = "LORAG_API_KEY"


class Target:
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
        from lorag.adapters.registry import AdapterRegistry
        from lorag.serving.adapter_service import AdapterService

        return AdapterService(self.settings, AdapterRegistry(self.settings.state_path))


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


pass_target = click.make_pass_decorator(Target)


@click.group("adapters")
@click.option("--config", "-c", type=click.Path(dir_okay=False), help="lorag.toml.")
@click.option("--state-dir", help="State directory (default .lorag).")
@click.option("--model", help="Base model path (for validation when no server runs).")
@click.option("--server", envvar=SERVER_ENV, help="A running server's URL (default: the configured one, if it answers).")
@click.option("--api-key", envvar=API_KEY_ENV, help="Admin API key for the server.")
@click.option("--offline", is_flag=True, help="Edit the registry directly even if a server answers.")
@click.pass_context
def adapters_group(ctx: click.Context, config: str | None, state_dir: str | None, model: str | None,
                   server: str | None, api_key: str | None, offline: bool) -> None:
    """Register, list, switch and remove LoRA adapters."""
    settings = load_settings(config, {"state_dir": state_dir, "model.path": model})
    ctx.obj = Target(settings, server, api_key, offline)


@adapters_group.command("add")
@click.argument("name")
@click.argument("path", type=click.Path())
@click.option("--version", help="Version label (default: v1, v2, ...).")
@click.option("--no-activate", is_flag=True, help="Register without making it the name's current version.")
@pass_target
def add(target: Target, name: str, path: str, version: str | None, no_activate: bool) -> None:
    """Validate and register the PEFT LoRA directory PATH as NAME (a new version if NAME exists)."""
    if target.client:
        body = {"name": name, "path": str(Path(path).resolve()), "version": version, "activate": not no_activate}
        entry = target.call("POST", "/admin/adapters", json=body)
    else:
        if not target.settings.model.path:
            raise LoragError("No server is running and no base model is known: pass --model or --config.")
        from lorag.adapters.registry import version_to_json

        added = asyncio.run(target.service().add(name, Path(path), version=version,
                                                 activate=not no_activate, trusted=True))
        entry = version_to_json(added)
    click.echo(f"registered {entry['name']}@{entry['version']} (lora_int_id {entry['lora_int_id']}, rank {entry['rank']})")


@adapters_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_target
def list_(target: Target, as_json: bool) -> None:
    """List adapters and their versions (* marks the current one)."""
    rows = target.call("GET", "/admin/adapters")["data"] if target.client else target.service().list()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no adapters registered")
    for row in rows:
        mark = "*" if row["current"] else " "
        click.echo(f"{mark} {row['name']}@{row['version']}  id={row['lora_int_id']}  rank={row['rank']}  {row['source']}")


@adapters_group.command("show")
@click.argument("name")
@pass_target
def show(target: Target, name: str) -> None:
    """Show NAME's versions and which is current."""
    data = target.call("GET", f"/admin/adapters/{name}") if target.client else target.service().registry.describe(name)
    click.echo(json.dumps(data, indent=2))


@adapters_group.command("activate")
@click.argument("name")
@click.argument("version")
@pass_target
def activate(target: Target, name: str, version: str) -> None:
    """Make VERSION the one requests for NAME get (running requests keep theirs)."""
    if target.client:
        target.call("POST", f"/admin/adapters/{name}/activate", json={"version": version})
    else:
        target.service().registry.activate(name, version)
    click.echo(f"{name} -> {name}@{version}")


@adapters_group.command("remove")
@click.argument("ref")
@pass_target
def remove(target: Target, ref: str) -> None:
    """Remove NAME (all versions) or NAME@VERSION."""
    from lorag.adapters.registry import split_ref

    name, version = split_ref(ref)
    if target.client:
        params = {"version": version} if version else {}
        removed = target.call("DELETE", f"/admin/adapters/{name}", params=params)["removed"]
    else:
        removed = [e.ref for e in target.service().remove(name, version)]
    click.echo("removed " + ", ".join(removed))


from lorag.adapters.train_cli import train_command  # noqa: E402

adapters_group.add_command(train_command)
