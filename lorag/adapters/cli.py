"""`lorag adapters add|list|show|activate|remove`.

With a running server (--server, $LORAG_SERVER, or one answering at the
configured host:port) the commands go through its admin API so the change is
live; otherwise they edit the registry in the state directory.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import click

from lorag.adapters.cli_backend import AdapterBackend, AdapterOptions, pass_backend
from lorag.adapters.train_cli import train_command
from lorag.cli_options import API_KEY_ENV, SERVER_ENV, config_options
from lorag.errors import LoragError


@click.group("adapters")
@config_options
@click.option("--model", help="Base model path (for validation when no server runs).")
@click.option("--server", envvar=SERVER_ENV, help="A running server's URL (default: the configured one, if it answers).")
@click.option("--api-key", envvar=API_KEY_ENV, help="Admin API key for the server.")
@click.option("--offline", is_flag=True, help="Edit the registry directly even if a server answers.")
@click.pass_context
def adapters_group(ctx: click.Context, model: str | None, server: str | None, api_key: str | None,
                   offline: bool) -> None:
    """Register, list, switch and remove LoRA adapters."""
    ctx.obj = AdapterOptions(model, server, api_key, offline)


@adapters_group.command("add")
@click.argument("name")
@click.argument("path", type=click.Path())
@click.option("--version", help="Version label (default: v1, v2, ...).")
@click.option("--no-activate", is_flag=True, help="Register without making it the name's current version.")
@pass_backend
def add(target: AdapterBackend, name: str, path: str, version: str | None, no_activate: bool) -> None:
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
@pass_backend
def list_(target: AdapterBackend, as_json: bool) -> None:
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
@pass_backend
def show(target: AdapterBackend, name: str) -> None:
    """Show NAME's versions and which is current."""
    data = target.call("GET", f"/admin/adapters/{name}") if target.client else target.service().registry.describe(name)
    click.echo(json.dumps(data, indent=2))


@adapters_group.command("activate")
@click.argument("name")
@click.argument("version")
@pass_backend
def activate(target: AdapterBackend, name: str, version: str) -> None:
    """Make VERSION the one requests for NAME get (running requests keep theirs)."""
    if target.client:
        target.call("POST", f"/admin/adapters/{name}/activate", json={"version": version})
    else:
        target.service().registry.activate(name, version)
    click.echo(f"{name} -> {name}@{version}")


@adapters_group.command("remove")
@click.argument("ref")
@pass_backend
def remove(target: AdapterBackend, ref: str) -> None:
    """Remove NAME (all versions) or NAME@VERSION."""
    from lorag.adapters.registry import split_ref

    name, version = split_ref(ref)
    if target.client:
        params = {"version": version} if version else {}
        removed = target.call("DELETE", f"/admin/adapters/{name}", params=params)["removed"]
    else:
        removed = [e.ref for e in asyncio.run(target.service().remove(name, version))]
    click.echo("removed " + ", ".join(removed))



adapters_group.add_command(train_command)
