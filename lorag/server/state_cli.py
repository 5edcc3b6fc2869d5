"""`lorag state migrate`: create or upgrade the shared state database; move a state directory's keys,
adapter registry and loop records (stored completions, feedback) in.

Run it once before pointing replicas at PostgreSQL (`[state] backend = "postgres"`); running it
again applies only what is new, copies only keys not there yet, and copies the loop records only
into a database that has none yet. Servers apply missing migrations themselves too, so an upgrade
needs no separate step.
"""

from __future__ import annotations

from pathlib import Path

import click

from lorag.adapters.registry import RegistryFile
from lorag.adapters.registry_pg import RegistryRow
from lorag.cli_options import cli_settings, config_options
from lorag.loop.database import SCHEMA, Database
from lorag.loop.database_copy import copy_loop
from lorag.loop.database_pg import PostgresDatabase
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
    """Create or upgrade the tables, then copy <state_dir>/keys.json's keys (revoked ones too), the
    adapter registry and loop/loop.sqlite3's stored completions and feedback in."""
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
    click.echo(f"stored completions: {import_loop(url, settings.state_path / 'loop' / 'loop.sqlite3')}")


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


def import_loop(url: str, path: Path) -> str:
    """Copy loop.sqlite3 in unless the database already has stored completions; what happened, in words."""
    if not path.is_file():
        return f"nothing to copy (no {path})"
    source, target = Database(path, SCHEMA), PostgresDatabase(url)
    try:
        copied = copy_loop(source, target)
    finally:
        source.close()
        target.close()
    if copied.skipped:
        return f"not copied from {path}: {copied.skipped} (left as it is)"
    return f"copied from {path}: " + ", ".join(f"{count} {table}" for table, count in copied.rows.items())
