"""Stored chat completions: what a `store: true` request was answered with, kept for the loop.

A record is what the model saw and said, after every guard: the conversation as the input
hooks let it through (redacted text stays redacted), the rendered prompt with the retrieved
context and its sources, the domain and adapter version, and the answer after the output
hooks, in OpenAI's ChatCompletion shape. A key sees only its own records (admins: all);
records expire `retention_days` after they were made.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from lorag.errors import NotFoundError
from lorag.loop.database import LoopDatabase

Order = Literal["asc", "desc"]
DAY_S = 86_400


@dataclass
class StoredCompletion:
    """One stored completion as written: the response in OpenAI's shape plus what lorag knows of it."""

    id: str
    owner: str
    created: int
    expires_at: int
    model: str
    domain: str | None
    adapter: str | None
    metadata: dict[str, str]
    messages: list[dict[str, Any]]  # the conversation after the input hooks
    response: dict[str, Any]  # the ChatCompletion as sent (after the output hooks)
    context: dict[str, Any] = field(default_factory=dict)  # rendered messages, citations

    @property
    def prompt_hash(self) -> str:
        return prompt_hash(self.model, self.messages)

    def to_openai(self) -> dict[str, Any]:
        """The ChatCompletion of GET /v1/chat/completions/{id}: the response, with its current metadata."""
        return {**self.response, "metadata": self.metadata}

    def answer(self, index: int = 0) -> str:
        """The text of one choice as sent."""
        for choice in self.response.get("choices", []):
            if choice.get("index") == index:
                return str(choice.get("message", {}).get("content") or "")
        return ""


def prompt_hash(model: str, messages: list[dict[str, Any]]) -> str:
    """Two completions answer "the same prompt" when the model asked for and the conversation are equal."""
    canonical = json.dumps([model, [[m.get("role"), m.get("content")] for m in messages]], ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def missing(completion_id: str) -> NotFoundError:
    """The same 404 for a completion that never was, has expired, or is another key's."""
    return NotFoundError(f"No stored chat completion {completion_id!r}.", param="completion_id",
                         code="completion_not_found")


class CompletionStore:
    """Stored completions in the loop database; `owner=None` is an admin's view of every key's."""

    def __init__(self, db: LoopDatabase) -> None:
        self.db = db

    def add(self, *records: StoredCompletion) -> list[str]:
        """Store records in one transaction (a busy server's recorder writes what queued up at once).

        An id already stored (a client that sent the same x-request-id twice) keeps its first record;
        the ids left out are returned, and the rest of the batch is stored all the same.
        """
        if not records:
            return []
        rows = [(record.id, record.owner, record.created, record.expires_at, record.model, record.domain,
                 record.adapter, record.prompt_hash, _dump(record.metadata), _dump(record.messages),
                 _dump(record.response), _dump(record.context)) for record in records]
        with self.db.transaction() as conn:
            written = conn.executemany(
                "INSERT INTO completions (id, owner, created, expires_at, model, domain, adapter, prompt_hash, "
                "metadata, messages, response, context) VALUES (?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT DO NOTHING",
                rows).rowcount
            if written == len(records):
                return []
            # The rare case: which were left out. The first record of an id won; it is ours if its response is.
            found = conn.execute(f"SELECT id, response FROM completions WHERE id IN ({','.join('?' * len(rows))})",
                                 [row[0] for row in rows]).fetchall()
            stored = {row["id"]: row["response"] for row in found}
        kept: set[str] = set()
        left_out = []
        for row in rows:
            if row[0] in kept or stored.get(row[0]) != row[10]:
                left_out.append(row[0])
            kept.add(row[0])
        return left_out

    def get(self, completion_id: str, owner: str | None) -> StoredCompletion:
        rows = self.db.rows(f"SELECT * FROM completions WHERE id = ? AND {_VISIBLE}", (completion_id, int(time.time())))
        if not rows or (owner is not None and rows[0]["owner"] != owner):
            raise missing(completion_id)
        return _record(rows[0])

    def page(self, owner: str | None, *, model: str | None = None, metadata: dict[str, str] | None = None,
             order: Order = "asc", after: str | None = None, limit: int = 20) -> tuple[list[StoredCompletion], bool]:
        """One page in creation order, and whether more follow (OpenAI's list filters)."""
        where, params = self._filters(owner, model, metadata)
        if after is not None:
            where.append(f"seq {'>' if order == 'asc' else '<'} ?")
            params.append(self._seq_of(after, owner))
        sql = (f"SELECT * FROM completions WHERE {' AND '.join(where)} "
               f"ORDER BY seq {'ASC' if order == 'asc' else 'DESC'} LIMIT ?")
        rows = self.db.rows(sql, [*params, limit + 1])
        return [_record(row) for row in rows[:limit]], len(rows) > limit

    def select(self, owner: str | None, *, model: str | None = None, domain: str | None = None,
               metadata: dict[str, str] | None = None, since: int | None = None,
               until: int | None = None) -> list[StoredCompletion]:
        """Every visible completion that passes the filters, oldest first (what training data is made of)."""
        where, params = self._filters(owner, model, metadata)
        for clause, value in (("domain = ?", domain), ("created >= ?", since), ("created < ?", until)):
            if value is not None:
                where.append(clause)
                params.append(value)
        rows = self.db.rows(f"SELECT * FROM completions WHERE {' AND '.join(where)} ORDER BY seq", params)
        return [_record(row) for row in rows]

    def update_metadata(self, completion_id: str, owner: str | None, metadata: dict[str, str]) -> StoredCompletion:
        self.get(completion_id, owner)
        with self.db.transaction() as conn:
            conn.execute("UPDATE completions SET metadata = ? WHERE id = ?", (_dump(metadata), completion_id))
        return self.get(completion_id, owner)

    def delete(self, completion_id: str, owner: str | None) -> None:
        """Gone with its ratings and preferences (foreign keys cascade)."""
        self.get(completion_id, owner)
        with self.db.transaction() as conn:
            conn.execute("DELETE FROM completions WHERE id = ?", (completion_id,))

    def sweep(self, now: float | None = None) -> int:
        """Delete what has expired; returns how many went."""
        with self.db.transaction() as conn:
            cursor = conn.execute("DELETE FROM completions WHERE expires_at <= ?", (int(now or time.time()),))
        return cursor.rowcount

    def _filters(self, owner: str | None, model: str | None,
                 metadata: dict[str, str] | None) -> tuple[list[str], list[Any]]:
        where: list[str] = [_VISIBLE]
        params: list[Any] = [int(time.time())]
        if owner is not None:
            where.append("owner = ?")
            params.append(owner)
        if model is not None:
            where.append("model = ?")
            params.append(model)
        for key, value in (metadata or {}).items():
            where.append(self.db.metadata_clause)
            params.extend([key, value])
        return where, params

    def _seq_of(self, completion_id: str, owner: str | None) -> int:
        """Where a cursor points; a cursor the key cannot see is a 404, as in lorag's other lists."""
        rows = self.db.rows(f"SELECT seq, owner FROM completions WHERE id = ? AND {_VISIBLE}",
                            (completion_id, int(time.time())))
        if not rows or (owner is not None and rows[0]["owner"] != owner):
            raise NotFoundError(f"No stored chat completion {completion_id!r} to page after: pass the last_id "
                                "of a previous page.", param="after", code="cursor_not_found")
        return int(rows[0]["seq"])


_VISIBLE = "expires_at > ?"


def _dump(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _record(row: Any) -> StoredCompletion:
    return StoredCompletion(id=row["id"], owner=row["owner"], created=row["created"], expires_at=row["expires_at"],
                            model=row["model"], domain=row["domain"], adapter=row["adapter"],
                            metadata=json.loads(row["metadata"]), messages=json.loads(row["messages"]),
                            response=json.loads(row["response"]), context=json.loads(row["context"]))
