"""`lorag fleet status`: the vLLM servers behind a running `lorag serve` with the remote backend."""

from __future__ import annotations

import json

import click

from lorag.adapters.cli_backend import AdapterBackend
from lorag.cli_options import API_KEY_ENV, SERVER_ENV, cli_settings, config_options
from lorag.errors import LoragError


@click.group("fleet")
@config_options
def fleet_group() -> None:
    """The vLLM servers lorag sends generation to ([engine] backend = "remote")."""


@fleet_group.command("status")
@config_options
@click.option("--server", envvar=SERVER_ENV, help="The lorag server's URL (default: the configured one).")
@click.option("--api-key", envvar=API_KEY_ENV, help="Admin API key for the server.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def status(server: str | None, api_key: str | None, as_json: bool) -> None:
    """Per vLLM server: up, requests in flight, adapters loaded and refused, reconcile repairs."""
    backend = AdapterBackend(cli_settings(), server, api_key, offline=False)
    if backend.client is None:
        raise LoragError("No lorag server answers at the configured address; start `lorag serve` or pass --server.")
    data = backend.call("GET", "/admin/fleet")
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    if data["backend"] != "remote":
        click.echo("this server runs its engine in process (engine.backend = \"local\"): no fleet")
        return
    click.echo(f"{'SERVER':<20} {'UP':<4} {'IN-FLIGHT':>9} {'REQUESTS':>8} {'ADAPTERS':>8} {'REPAIRS':>7}  REFUSED")
    for s in data["servers"]:
        refused = ", ".join(f"{a} ({why})" for a, why in s["refused"].items()) or "-"
        resting = s.get("resting_s", 0)
        up = ("rest" if resting else "yes") if s["up"] and s["ready"] else "no"
        click.echo(f"{s['name']:<20} {up:<4} {s['in_flight']:>9} {s['requests']:>8} {len(s['adapters']):>8} "
                   f"{s['repairs']:>7}  {refused}")
        if s["error"] and up != "yes":
            click.echo(f"    {s['error']}" + (f" (no traffic for {resting:g} s more)" if up == "rest" else ""))
