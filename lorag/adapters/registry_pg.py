"""The adapter registry's document in PostgreSQL (`[state] backend = "postgres"`), for every replica.

The registry (lorag.adapters.registry) is one JSON document: names, versions, the current
version of each, the next engine id. Here it is the one row of `adapter_registry`. A writer
locks the row (SELECT ... FOR UPDATE), so writers on every replica take turns, each on the
latest document, and NOTIFYs `lorag_adapters` with its UPDATE; every replica LISTENs and
re-reads the row at its next lookup (and after its listening connection was cut). The adapters'
files go under `[state] shared_dir`, a directory every replica mounts.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg

from lorag.adapters.registry import AdapterRegistry, RegistryDocument
from lorag.config import Settings
from lorag.errors import LoragError
from lorag.state.database import describe
from lorag.state.session import StateSession

CHANNEL = "lorag_adapters"


class RegistryRow:
    """RegistryDocument over the `adapter_registry` row, in a state session of its own."""

    def __init__(self, url: str, *, listen: bool = True) -> None:
        self.where = "the state database ([state] url)"
        self.session = StateSession(url, CHANNEL, failure=lambda message: LoragError(f"the adapter registry: {message}"))
        self.listen = listen

    def read(self) -> dict[str, Any] | None:
        row = self.session.run(lambda conn: conn.execute("SELECT doc FROM adapter_registry WHERE id = 1").fetchone())
        return dict(row[0]) if row else None

    @contextmanager
    def locked(self) -> Iterator[None]:
        """The row locked (FOR UPDATE) for the writer's whole turn; its writes commit together."""
        with self.session.lock:
            try:
                conn = self.session.connection()
                with conn.transaction():
                    conn.execute("INSERT INTO adapter_registry (id, doc) VALUES (1, '{}') ON CONFLICT DO NOTHING")
                    conn.execute("SELECT 1 FROM adapter_registry WHERE id = 1 FOR UPDATE")
                    yield
            except psycopg.Error as err:
                self.session.forget()
                raise self.session.failure(f"the state database failed: {describe(err)}") from None

    def write(self, data: dict[str, Any]) -> None:
        def update(conn: psycopg.Connection[Any]) -> None:
            conn.execute("UPDATE adapter_registry SET doc = %s WHERE id = 1", (json.dumps(data),))
            conn.execute(f"NOTIFY {CHANNEL}")

        self.session.run(update)

    def generation(self) -> int:
        return self.session.generation() if self.listen else 0

    def close(self) -> None:
        self.session.close()


def open_registry(settings: Settings, *, listen: bool = True) -> AdapterRegistry:
    """The registry a configuration uses: registry.json under the state directory, or the shared row
    (its files then under `[state] shared_dir`, else the state directory). `listen=False` for
    one-off commands, which read once and need no notifications."""
    if settings.state.backend != "postgres":
        return AdapterRegistry(settings.state_path)
    document: RegistryDocument = RegistryRow(settings.state.url, listen=listen)
    root = settings.shared_path
    return AdapterRegistry(root, document)
