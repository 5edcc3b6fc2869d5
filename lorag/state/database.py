"""PostgreSQL for shared state: connections and versioned migrations.

Migrations are numbered SQL steps applied in order, each in its own transaction and recorded in
`lorag_schema`; a step is never edited once released, only followed by a new one. Every process
that opens the database applies what is missing first, under an advisory lock, so two replicas
starting at once do not both apply a step.
"""

from __future__ import annotations

from typing import Any

import psycopg

from lorag.errors import LoragError
from lorag.logging import get_logger

log = get_logger("lorag.state")
MIGRATION_LOCK = 0x6C6F726167  # pg_advisory_lock key: "lorag"
CONNECT_TIMEOUT_S = 3  # reads of keys and the registry may wait this long (on the event loop) when it is gone

# (version, what it does, SQL). Append only.
MIGRATIONS: list[tuple[int, str, str]] = [
    (1, "api keys", """
        CREATE TABLE api_keys (
            id          text PRIMARY KEY,
            name        text NOT NULL,
            prefix      text NOT NULL,
            hash        text NOT NULL UNIQUE,
            created_at  text NOT NULL,
            revoked_at  text,
            scopes      jsonb NOT NULL
        );
        CREATE UNIQUE INDEX api_keys_one_active_name ON api_keys (name) WHERE revoked_at IS NULL;
    """),
    (2, "adapter registry", """
        CREATE TABLE adapter_registry (
            id   integer PRIMARY KEY CHECK (id = 1),
            doc  jsonb NOT NULL
        );
    """),
]


class StateDatabaseError(LoragError):
    """The shared state database cannot be reached or refused a statement."""

    status_code = 503
    error_type = "server_error"
    code = "state_unavailable"


def connect(url: str, **options: Any) -> psycopg.Connection[Any]:
    """A connection (autocommit: callers open transactions where they need them)."""
    try:
        return psycopg.connect(url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S, **options)
    except psycopg.Error as err:
        raise StateDatabaseError(f"cannot reach the state database: {describe(err)}") from None


def describe(err: BaseException) -> str:
    """One line of a driver error (libpq's messages run over several)."""
    return " ".join(str(err).split()) or type(err).__name__


def migrate(url: str) -> list[int]:
    """Apply the missing migrations; returns the versions applied now."""
    applied: list[int] = []
    with connect(url) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK,))
        try:
            conn.execute("CREATE TABLE IF NOT EXISTS lorag_schema (version integer PRIMARY KEY, name text NOT NULL, "
                         "applied_at timestamptz NOT NULL DEFAULT now())")
            done = {row[0] for row in conn.execute("SELECT version FROM lorag_schema")}
            for version, name, sql in MIGRATIONS:
                if version in done:
                    continue
                with conn.transaction():
                    conn.execute(sql)
                    conn.execute("INSERT INTO lorag_schema (version, name) VALUES (%s, %s)", (version, name))
                log.info("state_migrated", version=version, name=name)
                applied.append(version)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK,))
    return applied
