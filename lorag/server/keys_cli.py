"""`lorag keys create|list|revoke`: manage the API keys (`<state_dir>/keys.json`, or the state database).

A running server picks changes up on its next request; no restart, no server call.
"""

from __future__ import annotations

import json

import click

from lorag.cli_options import cli_settings, config_options
from lorag.config import Settings
from lorag.server.key_stores import key_store
from lorag.server.keys import KeyStore, Scopes, StoredKey
from lorag.server.keys_pg import PostgresKeyStore


def _open() -> tuple[Settings, KeyStore | PostgresKeyStore]:
    """The chosen config and its key store (which lives in the state dir)."""
    settings = cli_settings()
    return settings, key_store(settings)


@click.group("keys")
@config_options
def keys_group() -> None:
    """API keys: create (the secret is shown once), list, revoke. Only hashes are stored."""


@keys_group.command("create")
@click.option("--name", required=True, help="A unique name (domains may grant access by key name).")
@click.option("--admin", is_flag=True, help="Admin key: every domain, knowledge, fine-tuning and the admin endpoints.")
@click.option("--domain", "domains", multiple=True, metavar="DOMAIN", help="Limit the key to this domain (repeatable; default: all).")
@click.option("--no-knowledge", is_flag=True, help="May not query knowledge bases directly (/v1/knowledge).")
@click.option("--no-overrides", is_flag=True, help="May not override retrieval or the adapter per request.")
@click.option("--fine-tune", is_flag=True,
              help="May upload files and run fine-tuning jobs (/v1/files, /v1/fine_tuning); off by default.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (the secret included, once).")
@config_options
def create_cmd(name: str, admin: bool, domains: tuple[str, ...], no_knowledge: bool, no_overrides: bool,
               fine_tune: bool, as_json: bool) -> None:
    """Create a key and print its secret. It cannot be shown again: store it now."""
    settings, store = _open()
    reserved = frozenset(k.name for k in settings.server.api_keys if k.name)
    entry, secret = store.create(name, admin=admin, domains=list(domains) if domains else None,
                                 knowledge=not no_knowledge, overrides=not no_overrides, fine_tune=fine_tune,
                                 reserved_names=reserved)
    for domain in domains:
        if domain not in settings.domains:
            click.echo(f"warning: domain {domain!r} is not defined in the config (yet)", err=True)
    if as_json:
        click.echo(json.dumps({**entry.public(), "key": secret}, indent=2))
        return
    click.echo(secret)
    click.echo(f"created key {entry.name!r} ({entry.id}, {entry.scopes.describe()}) in {store.where}; "
               "the secret above is shown only this once", err=True)


@keys_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--all", "show_all", is_flag=True, help="Include revoked keys.")
@config_options
def list_cmd(as_json: bool, show_all: bool) -> None:
    """List keys (never their secrets): from the key store, and those in lorag.toml."""
    settings, store = _open()
    stored = [k for k in store.load() if show_all or k.active]
    configured = [(k.name or "(unnamed)", Scopes.of(k)) for k in settings.server.api_keys]
    if as_json:
        rows = [{**k.public(), "source": "store"} for k in stored]
        rows += [{"name": name, "source": "config", "scopes": scopes.to_json()} for name, scopes in configured]
        click.echo(json.dumps({"keys": rows}, indent=2))
        return
    if not stored and not configured:
        click.echo("no API keys (create one with `lorag keys create --name NAME`)")
        return
    table = [("ID", "NAME", "PREFIX", "SCOPES", "CREATED", "STATUS")]
    table += [_row(k) for k in stored]
    table += [("-", name, "-", scopes.describe(), "-", "lorag.toml") for name, scopes in configured]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


@keys_group.command("revoke")
@click.argument("name_or_id")
@config_options
def revoke_cmd(name_or_id: str) -> None:
    """Revoke a key by name or id; a running server refuses it from its next request."""
    settings, store = _open()
    if any(k.name == name_or_id for k in settings.server.api_keys) and not any(
        k.name == name_or_id or k.id == name_or_id for k in store.load()
    ):
        raise click.ClickException(
            f"key {name_or_id!r} is configured in lorag.toml (server.api_keys); remove it there and restart"
        )
    entry = store.revoke(name_or_id)
    click.echo(f"revoked key {entry.name!r} ({entry.id}, {entry.prefix}...)")


def _row(key: StoredKey) -> tuple[str, str, str, str, str, str]:
    status = "active" if key.active else f"revoked {key.revoked_at}"
    return (key.id, key.name, key.prefix + "...", key.scopes.describe(), key.created_at, status)

