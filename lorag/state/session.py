"""One store's use of the state database: its connection, and the changes other processes made.

The key store and the adapter registry each hold one: a connection opened (and the schema
migrated) on first use and reopened once when it broke, used under a lock (psycopg connections
are not for two threads at once), and a listener on the store's NOTIFY channel, started on the
first look at it (one-off commands never start one).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

import psycopg

from lorag.state.database import StateDatabaseError, connect, describe, migrate
from lorag.state.listener import ChangeListener

T = TypeVar("T")


class StateSession:
    """`failure(message)` is the error a store raises when the database fails it (a key store's
    is a 500 that lets nobody in; a registry's a LoragError)."""

    def __init__(self, url: str, channel: str, failure: Callable[[str], Exception] = StateDatabaseError) -> None:
        self.url = url
        self.channel = channel
        self.failure = failure
        self.lock = threading.RLock()
        self._conn: psycopg.Connection[Any] | None = None
        self._migrated = False
        self._listener: ChangeListener | None = None

    def connection(self) -> psycopg.Connection[Any]:
        """The open connection (call it holding `lock`)."""
        if self._conn is None or self._conn.closed:
            try:
                if not self._migrated:
                    migrate(self.url)
                    self._migrated = True
                self._conn = connect(self.url)
            except StateDatabaseError as err:
                raise self.failure(err.message) from None
        return self._conn

    def forget(self) -> None:
        """After a failed statement: the next use opens a fresh connection."""
        self._conn = None

    def run(self, work: Callable[[psycopg.Connection[Any]], T]) -> T:
        """`work(connection)` under the lock; once more on a fresh connection if the first broke."""
        with self.lock:
            for attempt in (1, 2):
                try:
                    return work(self.connection())
                except psycopg.OperationalError as err:
                    self.forget()
                    if attempt == 2:
                        raise self.failure(f"cannot reach the state database: {describe(err)}") from None
                except psycopg.Error as err:
                    self.forget()
                    raise self.failure(f"the state database refused a statement: {describe(err)}") from None
        raise AssertionError("unreachable")

    def generation(self) -> int:
        """Moves whenever the channel was notified, or this process may have missed a notification."""
        if self._listener is None:
            self._listener = ChangeListener(self.url, (self.channel,))
        return self._listener.generation(self.channel)

    def close(self) -> None:
        if self._listener is not None:
            self._listener.stop()
        with self.lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
