"""`lorag state migrate`: create or upgrade the shared state database; move a state directory's keys and adapter registry in.

Run it once before pointing replicas at PostgreSQL (`[state] backend = "postgres"`); running it
again applies only what is new and copies only keys not there yet. Servers apply missing
migrations themselves too, so an upgrade needs no separate step.
"""

from __future__ import annotations

import click

from lorag.adapters.registry import RegistryFile
from lorag.adapters.registry_pg import RegistryRow
from lorag.cli_options import cli_settings, config_options
from lorag.server.keys import KeyStore
from lorag.server.keys_pg import PostgresKeyStore
from lorag.state.database import migrate


@click.group("state")
@config_options
def state_group() -> None:
    """Shared state in PostgreSQL ([state] backend = "postgres"): migrations and moving keys in."""


@state_group.command("migrate")
@click.option("--url", default=None, help="postgresql://user@host/db (default: [state] url).")
@config_options
def migrate_cmd(url: str | None) -> None:
    """Create or upgrade the tables, then copy <state_dir>/keys.json's keys in (revoked ones too)."""
    settings = cli_settings()
    url = url or settings.state.url
    if not url:
        raise click.UsageError("no state database: pass --url or set [state] url in lorag.toml")
    applied = migrate(url)
    keys = KeyStore(settings.state_path).load()
    store = PostgresKeyStore(url)
    try:
        added = store.import_keys(keys)
    finally:
        store.close()
    adapters = import_registry(url, RegistryFile(settings.state_path / "adapters"))
    click.echo(f"schema: {'applied migrations ' + ', '.join(map(str, applied)) if applied else 'up to date'}")
    click.echo(f"API keys: {added} of {len(keys)} copied from {settings.state_path / 'keys.json'} "
               f"({len(keys) - added} already there)")
    click.echo(f"adapter registry: {adapters}")


def import_registry(url: str, source: RegistryFile) -> str:
    """Copy registry.json in unless the database already has adapters; what happened, in words."""
    document = source.read()
    if not document or not document.get("adapters"):
        return f"nothing to copy ({source.where} has no adapters)"
    row = RegistryRow(url, listen=False)
    try:
        with row.locked():
            if (row.read() or {}).get("adapters"):
                return "already in the database (left as it is)"
            row.write(document)
    finally:
        row.close()
    return (f"{len(document['adapters'])} adapters copied from {source.where}; their files stay under "
            f"{source.root}: every replica must reach that path ([state] shared_dir)")
