"""Which key store a configuration uses: keys.json in the state directory, or PostgreSQL."""

from __future__ import annotations

from lorag.config import Settings
from lorag.server.keys import KeyStore
from lorag.server.keys_pg import PostgresKeyStore


def key_store(settings: Settings) -> KeyStore | PostgresKeyStore:
    """`[state] backend = "postgres"`: the shared table; otherwise `<state_dir>/keys.json`."""
    if settings.state.backend == "postgres":
        return PostgresKeyStore(settings.state.url)
    return KeyStore(settings.state_path)
