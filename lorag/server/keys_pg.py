"""API keys in PostgreSQL (`[state] backend = "postgres"`): one key store for every replica.

The same keys as keys.json (lorag.server.keys: hashes, scopes, revocation), in the `api_keys`
table. A create or a revoke NOTIFYs `lorag_keys` in its own transaction; every server LISTENs
(lorag.state.listener), so its keyring re-reads the table at its next request. A listener cut
off counts as a change too (notifications sent meanwhile are lost), and a keyring re-reads at
least every MAX_AGE_S anyway (lorag.server.auth): a revoked key stops working on every replica
at once, and within MAX_AGE_S in the worst case. Nothing read is ever written back: a revoke
is one UPDATE of one row, decided in the database.
"""

from __future__ import annotations

import json
import time
from typing import Any

import psycopg
from psycopg.errors import UniqueViolation

from lorag.server.keys import (
    KeyStoreError,
    Scopes,
    StoredKey,
    check_name_free,
    duplicate_name,
    find_key,
    new_key,
    revoked_copy,
)
from lorag.state.session import StateSession

CHANNEL = "lorag_keys"
FAILED_RETRY_S = 1.0  # after a failed read, refuse at once for this long instead of waiting on a connect
COLUMNS = "id, name, prefix, hash, created_at, revoked_at, scopes"


class PostgresKeyStore:
    """The KeyStore interface (load, has_keys, create, revoke, signature) over the api_keys table."""

    def __init__(self, url: str) -> None:
        self.where = "the state database ([state] url)"
        self.session = StateSession(url, CHANNEL, failure=lambda message: KeyStoreError(f"API keys: {message}"))
        self._failed_at = float("-inf")

    def signature(self) -> int:
        """Moves whenever a key changed anywhere, or this process may have missed a change."""
        return self.session.generation()

    def load(self) -> list[StoredKey]:
        if time.monotonic() - self._failed_at < FAILED_RETRY_S:
            raise KeyStoreError("cannot read the API keys from the state database (it failed a moment ago)")
        try:
            rows = self.session.run(
                lambda conn: conn.execute(f"SELECT {COLUMNS} FROM api_keys ORDER BY created_at, id").fetchall())
        except KeyStoreError:
            self._failed_at = time.monotonic()
            raise
        return [_key(row) for row in rows]

    def has_keys(self) -> bool:
        return bool(self.load())

    def create(self, name: str, **scopes: Any) -> tuple[StoredKey, str]:
        """A new key and its secret (new_key's options); refused when an active key has the name."""
        def insert(conn: psycopg.Connection[Any]) -> tuple[StoredKey, str]:
            check_name_free([_key(row) for row in conn.execute(f"SELECT {COLUMNS} FROM api_keys").fetchall()],
                            name)  # a clear error before the unique index's
            entry, secret = new_key(name, taken_ids=set(), **scopes)
            try:
                with conn.transaction():
                    conn.execute(f"INSERT INTO api_keys ({COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s)",
                                 (entry.id, entry.name, entry.prefix, entry.hash, entry.created_at, None,
                                  json.dumps(entry.scopes.to_json())))
                    conn.execute(f"NOTIFY {CHANNEL}")
            except UniqueViolation:  # another replica created the same name at the same moment
                raise duplicate_name(name) from None
            return entry, secret

        return self.session.run(insert)

    def revoke(self, name_or_id: str) -> StoredKey:
        """Revoke by id, or by the name of an active key, in one transaction (rows locked)."""
        def update(conn: psycopg.Connection[Any]) -> StoredKey:
            with conn.transaction():
                keys = [_key(row) for row in
                        conn.execute(f"SELECT {COLUMNS} FROM api_keys ORDER BY created_at, id FOR UPDATE").fetchall()]
                revoked = revoked_copy(keys[find_key(keys, name_or_id)], name_or_id)
                conn.execute("UPDATE api_keys SET revoked_at = %s WHERE id = %s AND revoked_at IS NULL",
                             (revoked.revoked_at, revoked.id))
                conn.execute(f"NOTIFY {CHANNEL}")
            return revoked

        return self.session.run(update)

    def import_keys(self, keys: list[StoredKey]) -> int:
        """`lorag state migrate`: copy keys (a keys.json's) in; ids already there are left alone."""
        def insert(conn: psycopg.Connection[Any]) -> int:
            added = 0
            with conn.transaction():
                for key in keys:
                    cursor = conn.execute(
                        f"INSERT INTO api_keys ({COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                        (key.id, key.name, key.prefix, key.hash, key.created_at, key.revoked_at,
                         json.dumps(key.scopes.to_json())))
                    added += cursor.rowcount
                conn.execute(f"NOTIFY {CHANNEL}")
            return added

        return self.session.run(insert)

    def close(self) -> None:
        self.session.close()


def _key(row: tuple[Any, ...]) -> StoredKey:
    scopes = dict(row[6])
    if scopes.get("domains") is not None:
        scopes["domains"] = tuple(scopes["domains"])
    return StoredKey(id=row[0], name=row[1], prefix=row[2], hash=row[3], created_at=row[4], revoked_at=row[5],
                     scopes=Scopes(**scopes))
