"""`lorag state migrate`: a state directory's loop.sqlite3 copied into PostgreSQL, once.

Once means: only into a database that has no stored completions yet, all in one transaction.
Merging by id instead would bring back what a user deleted through a replica since the last
copy; a second run finds the rows there and leaves them alone. Rows keep their order (seq is
given anew, in the file's order); expired ones are copied too and go at the next sweep.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lorag.loop.database import Database
from lorag.loop.database_pg import PostgresDatabase

BATCH = 1000  # rows read from the file and sent at once
TABLES: dict[str, tuple[str, ...]] = {  # parents before children: the foreign keys hold at every insert
    "completions": ("id", "owner", "created", "expires_at", "model", "domain", "adapter", "prompt_hash", "metadata",
                    "messages", "response", "context"),
    "ratings": ("id", "completion_id", "owner", "score", "corrected", "comment", "created", "updated"),
    "preferences": ("id", "chosen", "rejected", "pair", "owner", "comment", "created", "updated"),
    "derived": ("file_id", "completion_id"),
}


@dataclass
class Copied:
    """What a copy did: rows per table, or why nothing was copied."""

    rows: dict[str, int] = field(default_factory=dict)
    skipped: str | None = None


def copy_loop(source: Database, target: PostgresDatabase) -> Copied:
    with target.transaction() as conn:
        # Replicas storing meanwhile wait for the copy (and a second copy running at once for the first).
        conn.execute("LOCK TABLE completions IN SHARE ROW EXCLUSIVE MODE")
        there = conn.execute("SELECT count(*) AS n FROM completions").fetchall()[0]["n"]
        if there:
            return Copied(skipped=f"the database already has {there} stored completions")
        copied = Copied()
        for table, columns in TABLES.items():
            copied.rows[table] = 0
            insert = (f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))}) "
                      "ON CONFLICT DO NOTHING")
            last = 0
            while batch := source.rows(f"SELECT rowid AS at, {', '.join(columns)} FROM {table} WHERE rowid > ? "
                                       f"ORDER BY rowid LIMIT {BATCH}", (last,)):
                copied.rows[table] += conn.executemany(
                    insert, [tuple(row[column] for column in columns) for row in batch]).rowcount
                last = batch[-1]["at"]
        return copied
