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
    # The loop's records, column for column as in loop.sqlite3 (lorag.loop.database): the JSON is
    # text, kept byte for byte as it was sent; `seq` is the insertion order lists page by.
    (3, "loop records", """
        CREATE TABLE completions (
            seq          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            id           text NOT NULL UNIQUE,
            owner        text NOT NULL,
            created      bigint NOT NULL,
            expires_at   bigint NOT NULL,
            model        text NOT NULL,
            domain       text,
            adapter      text,
            prompt_hash  text NOT NULL,
            metadata     text NOT NULL,
            messages     text NOT NULL,
            response     text NOT NULL,
            context      text NOT NULL
        );
        CREATE INDEX completions_by_owner ON completions (owner, seq);
        CREATE INDEX completions_by_expiry ON completions (expires_at);
        CREATE TABLE ratings (
            seq            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            id             text NOT NULL UNIQUE,
            completion_id  text NOT NULL REFERENCES completions (id) ON DELETE CASCADE,
            owner          text NOT NULL,
            score          double precision,
            corrected      text,
            comment        text,
            created        bigint NOT NULL,
            updated        bigint NOT NULL,
            UNIQUE (completion_id, owner)
        );
        CREATE TABLE preferences (
            seq       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            id        text NOT NULL UNIQUE,
            chosen    text NOT NULL REFERENCES completions (id) ON DELETE CASCADE,
            rejected  text NOT NULL REFERENCES completions (id) ON DELETE CASCADE,
            pair      text NOT NULL,
            owner     text NOT NULL,
            comment   text,
            created   bigint NOT NULL,
            updated   bigint NOT NULL,
            UNIQUE (pair, owner)
        );
        CREATE INDEX preferences_by_chosen ON preferences (chosen);
        CREATE INDEX preferences_by_rejected ON preferences (rejected);
        CREATE TABLE derived (
            file_id        text NOT NULL,
            completion_id  text NOT NULL,
            PRIMARY KEY (completion_id, file_id)
        );
    """),
    # Fine-tuning files' and jobs' records (lorag.finetune.records_pg), each the JSON document the
    # files backend keeps as meta.json or job.json; their bytes stay under [state] shared_dir.
    (4, "fine-tuning files and jobs", """
        CREATE TABLE fine_tuning_files (
            id          text PRIMARY KEY,
            created_ns  bigint NOT NULL,
            record      jsonb NOT NULL
        );
        CREATE INDEX fine_tuning_files_by_age ON fine_tuning_files (created_ns, id);
        CREATE TABLE fine_tuning_jobs (
            id          text PRIMARY KEY,
            created_ns  bigint NOT NULL,
            record      jsonb NOT NULL
        );
        CREATE INDEX fine_tuning_jobs_by_age ON fine_tuning_jobs (created_ns, id);
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
