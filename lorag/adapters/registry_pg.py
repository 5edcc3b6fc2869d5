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
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg

from lorag.adapters.registry import AdapterRegistry, RegistryDocument
from lorag.config import Settings
from lorag.errors import LoragError
from lorag.state.database import StateDatabaseError, connect, describe, migrate
from lorag.state.listener import ChangeListener

CHANNEL = "lorag_adapters"


class RegistryRow:
    """RegistryDocument over the `adapter_registry` row; one connection, used under a lock."""

    def __init__(self, url: str, *, listen: bool = True) -> None:
        self.url = url
        self.where = "the state database ([state] url)"
        self._lock = threading.RLock()
        self._conn: psycopg.Connection[Any] | None = None
        self._listener = ChangeListener(url, (CHANNEL,)) if listen else None

    def read(self) -> dict[str, Any] | None:
        with self._lock:
            row = self._execute("SELECT doc FROM adapter_registry WHERE id = 1").fetchone()
        return dict(row[0]) if row else None

    @contextmanager
    def locked(self) -> Iterator[None]:
        with self._lock:
            conn = self._connection()
            try:
                with conn.transaction():
                    conn.execute("INSERT INTO adapter_registry (id, doc) VALUES (1, '{}') ON CONFLICT DO NOTHING")
                    conn.execute("SELECT 1 FROM adapter_registry WHERE id = 1 FOR UPDATE")
                    yield
            except psycopg.Error as err:
                self._conn = None
                raise LoragError(f"the adapter registry in the state database failed: {describe(err)}") from None

    def write(self, data: dict[str, Any]) -> None:
        with self._lock:
            self._execute("UPDATE adapter_registry SET doc = %s WHERE id = 1", (json.dumps(data),))
            self._execute(f"NOTIFY {CHANNEL}")

    def generation(self) -> int:
        return self._listener.generation(CHANNEL) if self._listener is not None else 0

    def close(self) -> None:
        if self._listener is not None:
            self._listener.stop()
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            try:
                migrate(self.url)
                self._conn = connect(self.url)
            except StateDatabaseError as err:
                raise LoragError(f"the adapter registry: {err.message}") from None
        return self._conn

    def _execute(self, sql: str, params: tuple[Any, ...] = ()) -> Any:
        try:
            return self._connection().execute(sql, params)
        except psycopg.Error as err:
            self._conn = None
            raise LoragError(f"the adapter registry in the state database failed: {describe(err)}") from None


def open_registry(settings: Settings, *, listen: bool = True) -> AdapterRegistry:
    """The registry a configuration uses: registry.json under the state directory, or the shared row
    (its files then under `[state] shared_dir`, else the state directory). `listen=False` for
    one-off commands, which read once and need no notifications."""
    if settings.state.backend != "postgres":
        return AdapterRegistry(settings.state_path)
    document: RegistryDocument = RegistryRow(settings.state.url, listen=listen)
    root = Path(settings.state.shared_dir).expanduser().resolve() if settings.state.shared_dir else settings.state_path
    return AdapterRegistry(root, document)
