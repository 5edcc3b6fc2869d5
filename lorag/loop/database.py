"""One SQLite file for the loop's records: WAL, one connection behind a lock, used from worker threads.

SQLite because stored completions are many small rows that lists filter by owner, model and
metadata and page through in order, and the state directory is the embedded default; a commit
in WAL mode with synchronous=NORMAL costs no fsync, so storing stays off the request's way.
With `[state] backend = "postgres"` the same tables live in PostgreSQL (lorag.loop.database_pg).

The stores (completions, feedback, derived) hold one copy of their SQL for both: `LoopDatabase`
is what they may rely on. Their SQL is the portable subset: `?` placeholders, `ON CONFLICT`,
rows read by column name, no `IN ()` of nothing; the one dialect difference they need, a match
on one metadata key, is each database's `metadata_clause`.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, Protocol

SCHEMA = """
CREATE TABLE IF NOT EXISTS completions (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    owner TEXT NOT NULL,
    created INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    model TEXT NOT NULL,
    domain TEXT,
    adapter TEXT,
    prompt_hash TEXT NOT NULL,
    metadata TEXT NOT NULL,
    messages TEXT NOT NULL,
    response TEXT NOT NULL,
    context TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS completions_by_owner ON completions(owner, seq);
CREATE INDEX IF NOT EXISTS completions_by_expiry ON completions(expires_at);
CREATE TABLE IF NOT EXISTS ratings (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    completion_id TEXT NOT NULL REFERENCES completions(id) ON DELETE CASCADE,
    owner TEXT NOT NULL,
    score REAL,
    corrected TEXT,
    comment TEXT,
    created INTEGER NOT NULL,
    updated INTEGER NOT NULL,
    UNIQUE (completion_id, owner)
);
CREATE TABLE IF NOT EXISTS preferences (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    chosen TEXT NOT NULL REFERENCES completions(id) ON DELETE CASCADE,
    rejected TEXT NOT NULL REFERENCES completions(id) ON DELETE CASCADE,
    pair TEXT NOT NULL,
    owner TEXT NOT NULL,
    comment TEXT,
    created INTEGER NOT NULL,
    updated INTEGER NOT NULL,
    UNIQUE (pair, owner)
);
CREATE TABLE IF NOT EXISTS derived (
    file_id TEXT NOT NULL,
    completion_id TEXT NOT NULL,
    PRIMARY KEY (completion_id, file_id)
);
"""


class Cursor(Protocol):
    """What a statement leaves: how many rows it changed, the rows it read."""

    @property
    def rowcount(self) -> int: ...

    def fetchall(self) -> list[Any]: ...


class Statements(Protocol):
    """What a transaction offers the stores: statements with `?` placeholders."""

    def execute(self, sql: str, params: Sequence[Any] = ..., /) -> Cursor: ...

    def executemany(self, sql: str, params: Iterable[Sequence[Any]], /) -> Cursor: ...


class LoopDatabase(Protocol):
    """The loop's tables, SQLite's or PostgreSQL's; usable from any thread.

    Rows (from `rows()` and a cursor's `fetchall()`) are read by column name: `row["id"]`, `row.keys()`.
    """

    metadata_clause: str  # true when the row's metadata maps the first parameter to the second

    def transaction(self) -> AbstractContextManager[Statements]: ...

    def rows(self, sql: str, params: Sequence[Any] = ...) -> list[Any]: ...

    def close(self) -> None: ...


def loop_database(state_path: Path) -> Database:
    """The state directory's loop database (created on first use)."""
    return Database(state_path / "loop" / "loop.sqlite3", SCHEMA)


class Database:
    """A lock-guarded connection: a transaction at a time, from any thread."""

    metadata_clause = "EXISTS (SELECT 1 FROM json_each(metadata) WHERE json_each.key = ? AND json_each.value = ?)"

    def __init__(self, path: Path, schema: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute("PRAGMA foreign_keys=ON")
        self._conn.executescript(schema)

    @contextmanager
    def transaction(self) -> Iterator[Statements]:
        """All or nothing: BEGIN IMMEDIATE, then COMMIT, or ROLLBACK on any error."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    def close(self) -> None:
        with self._lock:
            self._conn.close()
