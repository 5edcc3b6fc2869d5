"""The loop's records in PostgreSQL (`[state] backend = "postgres"`), shared by every replica.

The same four tables as the SQLite file (lorag.loop.database), made by migration 3 of the state
database (lorag.state.database), and the same SQL: the stores write `?` placeholders, turned
into psycopg's here. One connection behind the session's lock, as with SQLite: the recorder
writes from its one thread and reads queue behind its writes anyway, so a pool would buy little;
a psycopg connection must never serve two threads at once. A transaction is PostgreSQL's (read
committed): two replicas storing at once both succeed, and a list pages by `seq`, the order the
rows were inserted in.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg.rows import dict_row

from lorag.config import Settings
from lorag.loop.database import LoopDatabase, Statements, loop_database
from lorag.state.database import StateDatabaseError, describe
from lorag.state.session import StateSession

CHANNEL = "lorag_loop"  # the session's; nothing listens: every read goes to the database


def open_loop_database(settings: Settings) -> LoopDatabase:
    """The loop database a configuration uses: the state directory's SQLite file, or the shared tables."""
    if settings.state.backend == "postgres":
        return PostgresDatabase(settings.state.url)
    return loop_database(settings.state_path)


def placeholders(sql: str) -> str:
    """SQLite's `?` as psycopg's `%s` (a literal `%` doubled); the stores' SQL has no `?` in a literal."""
    return sql.replace("%", "%%").replace("?", "%s")


class PgStatements:
    """The Statements of one transaction (or of one read) on a psycopg connection; rows are dicts."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn = conn

    def execute(self, sql: str, params: Sequence[Any] = (), /) -> psycopg.Cursor[dict[str, Any]]:
        cursor = self._conn.cursor(row_factory=dict_row)
        cursor.execute(placeholders(sql), list(params))
        return cursor

    def executemany(self, sql: str, params: Iterable[Sequence[Any]], /) -> psycopg.Cursor[dict[str, Any]]:
        cursor = self._conn.cursor(row_factory=dict_row)
        cursor.executemany(placeholders(sql), [list(row) for row in params])
        return cursor


class PostgresDatabase:
    """LoopDatabase over the state database; a failure is a 503 (`state_unavailable`), as for keys."""

    metadata_clause = "(metadata::jsonb ->> (?::text)) = ?"  # metadata is stored as text: byte for byte as sent

    def __init__(self, url: str) -> None:
        self.session = StateSession(url, CHANNEL,
                                    failure=lambda message: StateDatabaseError(f"stored completions: {message}"))

    @contextmanager
    def transaction(self) -> Iterator[Statements]:
        """All or nothing. A connection lost while idle (a restart, a failover) fails at BEGIN and is
        replaced then, so the write goes through; once statements ran, a failure is never retried."""
        with self.session.lock:
            conn = self.session.run(_begin)
            try:
                yield PgStatements(conn)
                conn.execute("COMMIT")
            except BaseException as err:
                with contextlib.suppress(psycopg.Error):
                    conn.execute("ROLLBACK")
                if not isinstance(err, psycopg.Error):
                    raise
                if isinstance(err, psycopg.OperationalError):
                    self.session.forget()
                raise self.session.failure(f"the state database failed: {describe(err)}") from None

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """A read, once more on a fresh connection when the first one broke."""
        return self.session.run(lambda conn: PgStatements(conn).execute(sql, params).fetchall())

    def close(self) -> None:
        self.session.close()


def _begin(conn: psycopg.Connection[Any]) -> psycopg.Connection[Any]:
    """BEGIN by hand: the session's connections autocommit, and a failed BEGIN is safe to repeat."""
    conn.execute("BEGIN")
    return conn

